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


class ConcatLinear(nn.Module):
    """y = [x·W_0ᵀ | x·W_1ᵀ | …] (+ b): projections of one input that cannot become one matrix, kept as ``parts``.

    A quantized file may store q/k/v (or gate/up) in different forms — llama-quantize's _M presets give attn_v
    more bits than attn_q/attn_k in some layers (Q6_K beside Q4_K), and keep a row width its types cannot
    divide in float. Re-quantizing a part would change its numbers, so each keeps its own layer and the outputs
    are concatenated (the C decode step takes GGUF parts as they are: kernels/decode_step.c ``gemv_parts``).
    """

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        if not mods or not all(hasattr(m, "in_features") and hasattr(m, "out_features") for m in mods):
            raise TypeError(f"cannot fuse layers of different types that are not all linear: "
                            f"{[type(m).__name__ for m in mods]}")
        if len({m.in_features for m in mods}) != 1:  # type: ignore[union-attr]
            raise ValueError("fused projections must share their input size")
        biases = [getattr(m, "bias", None) for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features)  # type: ignore[union-attr]
                              for b, m in zip(biases, mods)])
            for m in mods:  # the layers become the parts (fusion replaces them); one bias for the whole output
                m.bias = None  # type: ignore[union-attr]
        self.parts = nn.ModuleList(mods)
        self.in_features = mods[0].in_features  # type: ignore[union-attr]
        self.out_features = sum(m.out_features for m in mods)  # type: ignore[union-attr]
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kinds = [getattr(p, "kind", type(p).__name__) for p in self.parts]
        return f"parts={kinds}, in_features={self.in_features}, out_features={self.out_features}"


def cat_out_features(mods: list[nn.Module]) -> nn.Module:
    """Linear layers with a common input → one layer whose outputs are theirs, concatenated in order.

    Plain ``nn.Linear`` is concatenated here; a quantized linear provides ``cat_out(mods)`` itself; layers of
    different kinds stay side by side in a :class:`ConcatLinear`.
    """
    first = mods[0]
    if any(type(m) is not type(first) for m in mods):
        return ConcatLinear(mods)
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
    """Fuse q/k/v and gate/up projections of every block of ``model`` in place (each attention and gated
    FFN knows its own projections: their ``fuse()``); returns the model."""
    for m in list(model.modules()):
        if callable(getattr(m, "fuse", None)):
            m.fuse()
    return model
