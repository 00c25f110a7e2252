"""Turning a float model into a weight-only quantized one, kept apart from the model code (as gpt-fast's quantize.py).

``quantize_model(model, "int8" | "int4" | "nf4")`` replaces every ``nn.Linear`` by an :class:`Int8Linear` /
:class:`Int4Linear` / :class:`NF4Linear` (QLoRA's base) and gives a Llama a quantized output head (``model.output_head``): from ``lm_head``
when untied, from the embedding matrix when tied — the embedding lookup itself stays in float.
All replacements are built before any is swapped in, so a bad request leaves the model untouched.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import QuantLinear
from .int4 import GROUP_SIZES, Int4Linear, check_group
from .int8 import K_MULTIPLE, Int8Linear
from .nf4 import BLOCK as NF4_BLOCK
from .nf4 import NF4Linear

Scheme = Literal["int8", "int4", "nf4"]
SCHEMES: tuple[str, ...] = ("int8", "int4", "nf4")


def check_scheme(scheme: str | None, allowed: tuple[str, ...] = SCHEMES) -> None:
    if scheme is not None and scheme not in allowed:
        raise ValueError(f"quantization scheme must be one of {', '.join(map(repr, allowed))} or None; got {scheme!r}")


def quantize_weight(weight: torch.Tensor, scheme: Scheme, bias: torch.Tensor | None = None, group_size: int = 32,
                    compute_dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
    """A quantized linear layer computing x·Wᵀ + b for a float (out, in) ``weight``."""
    check_scheme(scheme)
    if scheme == "int8":
        return Int8Linear.from_float(weight, bias, compute_dtype)
    if scheme == "nf4":
        return NF4Linear.from_float(weight, bias)
    return Int4Linear.from_float(weight, bias, group_size, compute_dtype)


def check_quantizable(name: str, in_features: int, scheme: Scheme, group_size: int) -> None:
    try:
        if scheme == "int4":
            check_group(in_features, group_size)
        elif scheme == "nf4":
            if in_features % NF4_BLOCK:
                raise ValueError(f"NF4 weights need in_features divisible by {NF4_BLOCK}; got {in_features}")
        elif in_features % K_MULTIPLE:
            raise ValueError(f"int8 weights need in_features divisible by {K_MULTIPLE}; got {in_features}")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Scheme | None, group_size: int = 32,
                   compute_dtype: torch.dtype = torch.bfloat16, head: str = "int8") -> nn.Module:
    """Replace ``model``'s linear layers (and a Llama's LM head) by quantized ones, in place; returns ``model``.

    ``scheme=None`` leaves the model as it is. ``head``: "int8" (default), "int4" or "float" — the LM head
    of a Llama. int4 round-to-nearest on SmolLM2's head costs ~6% perplexity, int8 ~0.1%
    (docs/quantization.md), so the head defaults to int8 whatever the scheme, as llama.cpp's 4-bit mixes
    keep their output tensor at 6–8 bits.
    """
    check_scheme(scheme)
    check_scheme(None if head == "float" else head)
    if scheme is None:
        return model
    for s in (scheme, head):
        if s == "int4" and group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}; got {group_size}")
    is_llama = hasattr(model, "output_head") and model.output_head is None
    head_linear = "lm_head" if is_llama and isinstance(getattr(model, "lm_head", None), nn.Linear) else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head_linear}
    head_weight = None
    if is_llama and head != "float":
        head_weight = model.tok_embeddings.weight if head_linear is None else model.lm_head.weight
    for name, m in linears.items():
        check_quantizable(name, m.in_features, scheme, group_size)
    if head_weight is not None:
        check_quantizable("output head", head_weight.shape[1], head, group_size)  # type: ignore[arg-type]
    new = {name: quantize_weight(m.weight, scheme, m.bias, group_size, compute_dtype) for name, m in linears.items()}
    if head_weight is not None:
        head_bias = None if head_linear is None else model.lm_head.bias
        model.output_head = quantize_weight(head_weight, head, head_bias, group_size, compute_dtype)  # type: ignore[arg-type]
        if head_linear is not None:
            model.lm_head = None
    for name, q in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run the quantized layers' kernels in ``dtype`` (bfloat16: fast; float32: exact, scalar code on the CPU)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to(dtype)
    return model


def cat_out(mods: list[nn.Module]) -> nn.Module:
    """One layer whose output is the concatenation of the layers' outputs: fused q/k/v or gate/up projections.

    Works for :class:`Int8Linear`, :class:`Int4Linear` and plain ``nn.Linear`` (all of one class).
    """
    if not mods:
        raise ValueError("cat_out needs at least one layer")
    cls = type(mods[0])
    if issubclass(cls, QuantLinear):
        return cls.cat_out(mods)  # type: ignore[attr-defined]
    if cls is not nn.Linear or any(type(m) is not nn.Linear for m in mods):
        raise ValueError(f"cat_out joins Int8Linear, Int4Linear or nn.Linear layers of one class; got "
                         f"{sorted({type(m).__name__ for m in mods})}")
    if len({m.in_features for m in mods}) != 1:
        raise ValueError(f"cat_out joins layers with the same in_features; got {[m.in_features for m in mods]}")
    w = torch.cat([m.weight.detach() for m in mods])
    has_bias = any(m.bias is not None for m in mods)
    out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if has_bias:
            out.bias.copy_(torch.cat([m.bias.detach() if m.bias is not None else w.new_zeros(m.out_features)
                                      for m in mods]))
    return out


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
