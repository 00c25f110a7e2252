"""Activations the backward recomputes from tensors it keeps anyway, instead of keeping them too (selective
activation recomputation: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", §5).

A block that makes a cheap function of tensors autograd saves — RMSNorm's output (x and 1/rms are kept for its
own backward), SwiGLU's SiLU(g) ⊙ u (g and u likewise), attention's output laid out for the output projection —
names it with :func:`remember`. Under :func:`recompute_saved` (the trainer's forward), when autograd saves that
tensor, or a view of it, for a later op's backward (LoRA's A keeps its input), the saved entry holds the recipe;
the backward runs it again. The recipe's inputs are themselves saved by autograd, so its version checks catch an
in-place change to them. Outside the context :func:`remember` does nothing."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

_RECIPES: dict[int, tuple[Any, Callable[..., torch.Tensor], tuple[Any, ...]]] | None = None


def remember(out: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
    """Declare ``out == fn(*inputs)`` (the inputs must not change afterwards); returns ``out``."""
    if _RECIPES is not None:  # all held weakly: the recipe must not keep alive what autograd would free
        held = tuple(weakref.ref(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        _RECIPES[out.untyped_storage().data_ptr()] = (weakref.ref(out), fn, held)
    return out


def _pack(t: torch.Tensor) -> Any:
    entry = _RECIPES.get(t.untyped_storage().data_ptr()) if _RECIPES else None
    if entry is None:
        return t
    ref, fn, held = entry
    out = ref()
    inputs = tuple(h() if isinstance(h, weakref.ref) else h for h in held)
    whole = out is not None and out.is_contiguous() and not out.storage_offset() \
        and out.untyped_storage().nbytes() == t.untyped_storage().nbytes()
    if not whole or any(i is None for i in inputs):
        return t  # the recipe remakes a whole contiguous tensor: views of it are found by their offset and strides
    return fn, inputs, t.shape, t.stride(), t.storage_offset()


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    fn, inputs, shape, stride, offset = packed
    with torch.no_grad():
        return fn(*inputs).as_strided(shape, stride, offset)


@contextmanager
def recompute_saved() -> Iterator[None]:
    """Within: tensors declared by :func:`remember` are recomputed in the backward instead of saved."""
    global _RECIPES
    was, _RECIPES = _RECIPES, {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECIPES = was
