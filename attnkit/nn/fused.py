"""Projections fused for inference: one matrix product where the paper writes several.

Q = xW_Q, K = xW_K, V = xW_V share their input, so [Q | K | V] = x[W_Q | W_K | W_V] is one product
over the concatenated weights (the same for SwiGLU's gate and up projections). At batch 1 a CPU
decode step is a chain of small matrix–vector products; fusing them reads the same bytes in fewer,
larger operations. ``fuse_for_inference(model)`` fuses every attention and gated FFN in place; the
fused model computes the same function (checked in tests) but no longer has q/k/v or gate/up
parameters of its own — fuse after loading adapters or fine-tuning, not before.
"""

from __future__ import annotations

import torch
from torch import nn


def cat_out_features(mods: list[nn.Module]) -> nn.Module:
    """Linear layers with a common input → one layer whose outputs are theirs, concatenated in order.

    Plain ``nn.Linear`` is concatenated here; a quantized linear provides ``cat_out(mods)`` itself.
    """
    first = mods[0]
    if any(type(m) is not type(first) for m in mods):
        raise TypeError(f"cannot fuse layers of different types: {[type(m).__name__ for m in mods]}")
    if hasattr(type(first), "cat_out"):
        return type(first).cat_out(mods)  # type: ignore[attr-defined]
    if type(first) is not nn.Linear:
        raise TypeError(f"cannot fuse {type(first).__name__}: not nn.Linear and no cat_out()")
    if len({m.in_features for m in mods}) != 1:  # type: ignore[union-attr]
        raise ValueError("fused projections must share their input size")
    w = torch.cat([m.weight for m in mods])  # type: ignore[union-attr]
    has_bias = [m.bias is not None for m in mods]  # type: ignore[union-attr]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=any(has_bias), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if any(has_bias):
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features)  # type: ignore[union-attr]
                                        for m in mods]))
    return fused.requires_grad_(False)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up projections of every block of ``model`` in place; returns the model."""
    from .attention import MultiHeadAttention
    from .ffn import SwiGLU

    for m in model.modules():
        if isinstance(m, (MultiHeadAttention, SwiGLU)):
            m.fuse()
    return model
