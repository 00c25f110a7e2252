"""Which product a quantized layer takes for the rows of a step: chosen by what the rows are, never by
how many rows share the step (batch invariance).

A GGUF layer has two products (:mod:`attnkit.quant.native`): the integer kernel with 8-bit activations
(llama.cpp's method; memory-bound, the decode path) and a dense product on the weight decoded to
bf16/float32 (compute-bound, the prompt path). Each computes every row on its own in a fixed order, so a
row's result is the same in any batch — but the two differ from each other, so a request's greedy
tokens would change with server load if the choice followed the batch size. The engine's model runner
says what the rows of a pass are (:func:`rows_are`); outside the engine (scoring, direct model calls)
no kind is set and layers choose by row count (:data:`None`).

Prompt rows come in two kinds, by the length of their request's whole prompt (a property of the request, not
of the step): ``"short-prompt"`` (at most :data:`SHORT_PROMPT` tokens) takes the integer kernel (or a layer's integer
matrix product, :attr:`attnkit.quant.native.GGUFBlockLinear.int8_prompts`) — the
dense product decodes every weight of a layer however few its rows (1B Q8_0, 32-token prompt: 1.5 s to the first
token through it) — and ``"prompt"`` the layer's prompt product.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal, get_args

import torch

RowKind = Literal["prompt", "short-prompt", "generated"]
# tokens: the integer kernel beat decoding the weights up to ~64 rows a layer on AVX-512 (docs/performance.md,
# session 5); on AVX2 a 1B Q8_0 took 1.52 s (dense) vs 0.55 s (integer) for 32 tokens, 65 vs 52 tok/s at 512
SHORT_PROMPT = 64

_KIND: contextvars.ContextVar[RowKind | None] = contextvars.ContextVar("attnkit_row_kind", default=None)


@contextlib.contextmanager
def rows_are(kind: RowKind) -> Iterator[None]:
    """Within the block, every row a quantized layer sees is a prompt row (of a long or a short prompt) or a
    generated token's row."""
    if kind not in get_args(RowKind):
        raise ValueError(f"rows are one of {get_args(RowKind)}, not {kind!r}")
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


def current_rows() -> RowKind | None:
    """What the rows of the current pass are, or None outside the engine (and while ``torch.compile`` traces a
    model: the engine runs its passes eagerly, so a compiled model is one used outside it)."""
    if torch.compiler.is_compiling():
        return None
    return _KIND.get()
