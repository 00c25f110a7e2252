"""Buffers reused by name across calls: each (rows × cols)-sized intermediate that a layer makes afresh on every call
(a softmax's scores, a loss chunk's logits, a weight decoded for one product) is taken from one buffer per name,
grown to the largest asked and viewed to the shape asked. A fresh multi-megabyte tensor per call costs its page
faults every time (glibc maps and unmaps blocks that large), often more than the work done on it; one buffer per
layer would cost the memory of all of them. The callers use a buffer before the next call of theirs asks for it
(one thread runs a model's layers in turn).

Names are prefixed by their owner (``attention.``, ``loss.``, ``dense.``, ``tile.``), so an owner frees its own with
:func:`release`. A buffer made under ``torch.inference_mode`` cannot be written outside it; one is replaced there.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[str, torch.Tensor] = {}


def reused(name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``shape`` view of the buffer ``name`` of ``dtype`` (made or grown as needed; its contents are whatever the
    last user left). While ``torch.compile`` traces, a fresh tensor: a compiled graph owns its intermediates."""
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype)
    n = 1
    for s in shape:
        n *= int(s)
    buf = _BUFFERS.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        _BUFFERS[name] = buf = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def release(prefix: str = "") -> None:
    """Drop the buffers whose names start with ``prefix`` (all by default)."""
    for name in [n for n in _BUFFERS if n.startswith(prefix)]:
        del _BUFFERS[name]


def held(prefix: str = "") -> list[str]:
    """The names of the buffers held whose names start with ``prefix``."""
    return [n for n in _BUFFERS if n.startswith(prefix)]
