"""Normalisation layers.

LayerNorm (Ba et al. 2016): y = (x − μ) / √(σ² + ε) · γ + β, μ and σ² over the feature dimension.
RMSNorm (Zhang & Sennrich 2019): y = x / √(mean(x²) + ε) · γ — no centring, no bias (Llama, Qwen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recompute import remember


class LayerNorm(nn.Module):
    """(x − μ)/√(σ² + ε)·γ + β over the last dimension (computed by torch's fused kernel)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x/√(mean(x²) + ε)·γ over the last dimension, computed in float32.

    ``offset`` = 1 gives the (1 + γ) parameterisation some checkpoints use (Gemma).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f32 = torch.float32
        xf = x if x.dtype == f32 else x.float()
        w = self.weight if self.weight.dtype == f32 else self.weight.float()
        if self.offset:
            w = w + self.offset
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(self.eps))  # (..., 1)
        # under autocast the output is cast once here, to the dtype every product after it would cast it to (each
        # product's autocast would make, and its backward keep, a copy of its own)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = _normed(xf, r, w, dt)
        # autograd keeps x and r for the norm's own backward: the output, which the next layer's adapters would
        # keep too, is remade from them (attnkit.nn.recompute)
        return remember(y, _normed, xf, r, w, dt)


def _normed(xf: torch.Tensor, r: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = xf * r * w
    return y if y.dtype == dtype else y.to(dtype)


def make_norm(kind: str, dim: int, eps: float, offset: float = 0.0) -> nn.Module:
    """kind: 'layernorm' | 'rmsnorm'; ``offset`` 1: RMSNorm's (1 + γ) form (Gemma)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, offset)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
