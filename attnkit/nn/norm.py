"""Normalisation layers.

LayerNorm (Ba et al. 2016): y = (x − μ) / √(σ² + ε) · γ + β, μ and σ² over the feature dimension.
RMSNorm (Zhang & Sennrich 2019): y = x / √(mean(x²) + ε) · γ — no centring, no bias (Llama, Qwen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.ops import compile_constant, rms_norm
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
        # under autocast the output is cast once here, to the dtype every product after it would cast it to (each
        # product's autocast would make, and its backward keep, a copy of its own)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if _c_takes(xf, dt):  # one pass over each row in C
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
                y, _ = _RMSNormC.apply(xf, w, self.eps, dt)
                return remember(y, _c_normed, xf, w, self.eps, dt)  # (as below)
            return rms_norm(xf.contiguous(), w.contiguous(), self.eps, dt)[0]
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(self.eps))  # (..., 1)
        y = _normed(xf, r, w, dt)
        # autograd keeps x and r for the norm's own backward: the output, which the next layer's adapters would
        # keep too, is remade from them (attnkit.nn.recompute)
        return remember(y, _normed, xf, r, w, dt)


def _normed(xf: torch.Tensor, r: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = xf * r * w
    return y if y.dtype == dtype else y.to(dtype)


class _RMSNormC(torch.autograd.Function):
    """RMSNorm for a training step in one pass over each row, forward and backward (kernels/train_ops.c); returns
    (y, r), r = 1/√(mean(x²) + ε) per row, kept with x for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype):  # type: ignore[override]
        xc, wc = x.contiguous(), w.detach().contiguous()
        y, r = rms_norm(xc, wc, eps, dtype)
        ctx.save_for_backward(xc, wc, r)
        ctx.w_grad = w.requires_grad
        ctx.mark_non_differentiable(r)
        return y, r

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dr):  # type: ignore[override]
        x, w, r = ctx.saved_tensors
        d = x.shape[-1]
        dy = (dy if dy.dtype in (torch.bfloat16, torch.float32) else dy.float()).contiguous()
        dx = torch.empty_like(x)
        dw = torch.empty(d) if ctx.w_grad else None
        from ..kernels import train_kernels

        if train_kernels().ak_rmsnorm_backward(x.data_ptr(), w.data_ptr(), r.data_ptr(), dy.data_ptr(),
                                       int(dy.dtype == torch.bfloat16), x.numel() // d, d, dx.data_ptr(),
                                       0 if dw is None else dw.data_ptr(), torch.get_num_threads()):
            raise RuntimeError("ak_rmsnorm_backward failed")
        return dx, dw, None, None


def _c_takes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the C kernels take this norm (CPU, float32 rows, output bf16 or float32, a build with them)."""
    return x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and x.numel() > 0 and _have_kernels()


@compile_constant
def _have_kernels() -> bool:
    """Whether this build has the 512-bit training kernels (a constant to ``torch.compile``)."""
    from ..kernels import train_kernels

    return train_kernels() is not None


def _c_normed(xf: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The C forward's output again from x (the recompute of :mod:`.recompute`: the same operations, r included)."""
    return rms_norm(xf.contiguous(), w.detach().contiguous(), eps, dtype)[0]


def make_norm(kind: str, dim: int, eps: float, offset: float = 0.0) -> nn.Module:
    """kind: 'layernorm' | 'rmsnorm'; ``offset`` 1: RMSNorm's (1 + γ) form (Gemma)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, offset)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
