"""Which product a quantized layer takes for the rows of a step: chosen by what the rows are, never by
how many rows share the step (batch invariance).

A GGUF layer has two products (:mod:`attnkit.quant.native`): the integer kernel with 8-bit activations
(llama.cpp's method; memory-bound, the decode path) and a dense product on the weight decoded to
bf16/float32 (compute-bound, the prompt path). Each computes every row on its own in a fixed order, so a
row's result is the same in any batch — but the two differ from each other, so a request's greedy
tokens would change with server load if the choice followed the batch size. The engine's model runner
says what the rows of a pass are (:func:`rows_are`); outside the engine (scoring, direct model calls)
no kind is set and layers choose by row count (:data:`None`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

RowKind = Literal["prompt", "generated"]

_KIND: contextvars.ContextVar[RowKind | None] = contextvars.ContextVar("attnkit_row_kind", default=None)


@contextlib.contextmanager
def rows_are(kind: RowKind) -> Iterator[None]:
    """Within the block, every row a quantized layer sees is a prompt row or a generated token's row."""
    if kind not in ("prompt", "generated"):
        raise ValueError(f"rows are 'prompt' or 'generated', not {kind!r}")
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


def current_rows() -> RowKind | None:
    """What the rows of the current pass are, or None outside the engine."""
    return _KIND.get()
