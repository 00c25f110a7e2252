"""Position-wise feed-forward networks.

FFN(x) = act(x·W1 + b1)·W2 + b2 with act = ReLU (Vaswani et al. 2017, eq. 2) or GELU (BERT, GPT-2).
SwiGLU(x) = (SiLU(x·W_gate) ⊙ x·W_up)·W_down (Shazeer 2020, "GLU Variants Improve Transformer").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import cat_out_features
from .recompute import remember

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class FeedForward(nn.Module):
    """act(x·W1 + b1)·W2 + b2, applied to each position independently."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.act = get_activation(activation)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class _SiLUMul(torch.autograd.Function):
    """SiLU(g) ⊙ u keeping only g and u for the backward (SiLU recomputed there, as Liger-Kernel's SwiGLU):
    autograd of the two ops keeps SiLU(g) too, a third (tokens × d_ff) tensor per layer. Both passes run in one
    pass over the rows in C where the 512-bit kernels take them (kernels/train_ops.c; ``lib``), else in PyTorch.

        ∂/∂u = ∂h·SiLU(g)        ∂/∂g = ∂h·u·σ(g)·(1 + g·(1 − σ(g)))
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, lib) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, u)
        ctx.lib = lib
        return _silu_times(g, u) if lib is None else _c_silu_times(g, u, lib)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):  # type: ignore[override]
        g, u = ctx.saved_tensors
        if ctx.lib is not None and dh.dtype == g.dtype:
            dh = dh.contiguous()
            dg, du = torch.empty_like(g), torch.empty_like(u)
            ff = g.shape[-1]
            if not ctx.lib.ak_swiglu_backward(g.data_ptr(), u.data_ptr(), ff, ff, dh.data_ptr(), g.numel() // ff, ff,
                                              int(g.dtype == torch.bfloat16), dg.data_ptr(), du.data_ptr(),
                                              torch.get_num_threads()):
                return dg, du, None
        return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g), None


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SiLU(g) ⊙ u; under autograd through :class:`_SiLUMul`, and recomputed where a later op would keep it
    (:mod:`attnkit.nn.recompute`: the input of LoRA's A on the down projection)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        lib = _swiglu_kernels(g, u)
        return remember(_SiLUMul.apply(g, u, lib), _silu_times if lib is None else _c_silu_times, g, u,
                        *(() if lib is None else (lib,)))
    return _silu_times(g, u)


def _swiglu_kernels(g: torch.Tensor, u: torch.Tensor):
    """The C kernels where they take these operands (CPU, contiguous, both bf16 or both float32), else None."""
    if g.device.type != "cpu" or g.dtype != u.dtype or g.dtype not in (torch.bfloat16, torch.float32) \
            or g.shape != u.shape or not (g.is_contiguous() and u.is_contiguous()) or not g.numel():
        return None
    from ..kernels import train_kernels

    return train_kernels()


def _silu_times(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _c_silu_times(g: torch.Tensor, u: torch.Tensor, lib) -> torch.Tensor:
    """SiLU(g)·u by the C kernel (rounded once, where PyTorch's two ops round twice in bf16)."""
    h = torch.empty_like(g)
    ff = g.shape[-1]
    lib.ak_swiglu_forward(g.data_ptr(), u.data_ptr(), ff, ff, g.numel() // ff, ff, int(g.dtype == torch.bfloat16),
                          h.data_ptr(), torch.get_num_threads())
    return h


OVER_ROWS = 64  # from this many rows silu_mul_over writes the product over gate/up's storage


def silu_mul_over(gu: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) ⊙ up for a contiguous gu = [gate | up] (…, 2·d_ff) written over gu's own storage (inference; from
    OVER_ROWS rows, fewer take a product of their own): a prompt's FFN then holds one (tokens × 2·d_ff) tensor at its
    peak instead of also SiLU(gate) and the product.
    Row r of the result goes to r·d_ff; rows are taken in blocks [r0, 2·r0), so that no block's output overlaps an
    input row not yet read. The same operations, in the same order per element, as F.silu(gate) * up."""
    ff = gu.shape[-1] // 2
    rows = gu.view(-1, 2 * ff)
    gate, up = rows[:, :ff], rows[:, ff:]
    F.silu(gate, inplace=True)
    flat, m = rows.view(-1), rows.shape[0]
    if m < OVER_ROWS:  # a few rows: their product apart costs less than the blocks' extra calls
        return (gate * up).view(*gu.shape[:-1], ff)
    gate[:1].mul_(up[:1])  # row 0's output is its gate's place
    r0 = 1
    while r0 < m:
        r1 = min(m, 2 * r0)
        torch.mul(gate[r0:r1], up[r0:r1], out=flat[r0 * ff:r1 * ff].view(r1 - r0, ff))
        r0 = r1
    return flat[:m * ff].view(*gu.shape[:-1], ff)


class SwiGLU(nn.Module):
    """(act(x·W_gate) ⊙ x·W_up)·W_down; act = SiLU gives SwiGLU, GELU gives GeGLU."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.activation, self.act = activation, get_activation(activation)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gate_up_proj: nn.Module | None = None  # set by fuse(): [W_gate | W_up] in one product

    def fuse(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj`` (inference only; see :mod:`attnkit.nn.fused`)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = cat_out_features([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            # a quantized projection may apply act to its products as it makes them (no (rows, 2·d_ff) output)
            gated = getattr(self.gate_up_proj, "gated_product", None)
            if gated is not None and not torch.is_grad_enabled() and (h := gated(x, self.activation)) is not None:
                return self.down_proj(h)
            gu = self.gate_up_proj(x)
            if self.act is F.silu and gu.is_contiguous() and not (torch.is_grad_enabled() and gu.requires_grad):
                h = silu_mul_over(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                h = self.act(gate) * up
        elif self.act is F.silu:
            h = silu_mul(self.gate_proj(x), self.up_proj(x))
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.dropout(h) if self.training and self.dropout.p > 0 else h)


def make_ffn(kind: str, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True) -> nn.Module:
    """kind: 'relu' | 'gelu' | 'gelu_tanh' (FeedForward) or 'swiglu' | 'geglu' (gated)."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, "silu", bias=bias, dropout=dropout)
    if kind == "geglu":
        return SwiGLU(d_model, d_ff, "gelu_tanh", bias=bias, dropout=dropout)
    return FeedForward(d_model, d_ff, kind, dropout=dropout, bias=bias)
