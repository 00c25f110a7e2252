"""What every weight-only quantized linear layer shares: the nn.Linear interface around a kernel.

    y = x · Ŵᵀ + b,   Ŵ = dequant(Q, scales)    (weight-only quantization: activations stay float)

A subclass stores the codes Q and their scales as buffers (not parameters: they are not trained)
and supplies ``_matmul`` — x (M, in) in the kernel's compute dtype → (M, out_padded) — and
``dequantize``. The compute dtype is the dtype of the scales: bfloat16 by default, because
PyTorch's CPU kernels are vectorised for bfloat16 activations only (with float32 they fall back to
scalar code, 10–40× slower; see docs/quantization.md); ``module.float()`` turns the exact but slow
float32 path on, ``module.bfloat16()`` back off. Whatever the compute dtype, ``forward`` returns x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .frozen_grad import frozen_linear

DENSE_CHUNK = 1 << 20  # weights dequantized at a time on the dense path (4 MiB of float32)


class QuantLinear(nn.Module):
    """Base of :class:`~attnkit.quant.int8.Int8Linear` and :class:`~attnkit.quant.int4.Int4Linear`."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    #: batches of at least this many rows run as dequantize + float32 F.linear instead of the kernel (class
    #: attribute, set per subclass from benchmarks/quant.py; None = always the kernel). See docs/quantization.md.
    dense_min_rows: int | None = None
    dense_dtype: torch.dtype = torch.float32  # bf16 matmuls are 8× slower than float32 without AVX-512 bf16

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias.detach().float().contiguous()
        self.register_buffer("bias", bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) compute dtype → (M, ≥out) compute dtype
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight Ŵ the kernel multiplies by, as a dense (out, in) tensor (rows [start, stop) of it)."""
        raise NotImplementedError

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of Ŵ into ``out`` (float32 or bfloat16): the tiles of :mod:`attnkit.quant.frozen_grad`."""
        return out.copy_(self.dequantize(torch.float32, start, stop))

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """x · Ŵᵀ through F.linear in ``dense_dtype``, Ŵ dequantized a slice of rows at a time (no full float copy)."""
        n, dt = self.out_features, self.dense_dtype
        x = x.to(dt)
        rows = max(64, DENSE_CHUNK // self.in_features // 64 * 64)
        if rows >= n:
            return F.linear(x, self.dequantize(dt))
        y = x.new_empty(x.shape[0], n)  # (M, N)
        for r in range(0, n, rows):
            e = min(n, r + rows)
            y[:, r:e] = F.linear(x, self.dequantize(dt, r, e))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) float32 / bfloat16 / float16 → (..., out) in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: input dtype {x.dtype} is not floating point")
        if x.requires_grad and torch.is_grad_enabled():  # QLoRA: only x gets a gradient
            return frozen_linear(self, x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        m = self.dense_min_rows
        if m is not None and x2.shape[0] >= m:
            y = self._dense(x2).to(x.dtype)  # (M, out)
        else:
            y = self._matmul(x2.to(self.compute_dtype).contiguous())
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self) -> int:
        """Bytes of the buffers this layer keeps (codes, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


def cat_bias(mods: list[QuantLinear]) -> torch.Tensor | None:
    """The concatenated bias of layers joined along the output dimension (zeros where a part has none)."""
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])


def check_cat(mods: list[QuantLinear], cls: type) -> None:
    if not mods:
        raise ValueError("cat_out needs at least one layer")
    for m in mods:
        if type(m) is not cls:
            raise ValueError(f"cat_out joins layers of one class; got {type(m).__name__} among {cls.__name__}")
        if m.in_features != mods[0].in_features:
            raise ValueError(f"cat_out joins layers with the same in_features; got {m.in_features} and "
                             f"{mods[0].in_features}")
        if m.compute_dtype != mods[0].compute_dtype:
            raise ValueError(f"cat_out joins layers with one compute dtype; got {m.compute_dtype} and "
                             f"{mods[0].compute_dtype}")
