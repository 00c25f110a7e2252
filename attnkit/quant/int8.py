"""Int8 weight-only linear layer: one scale per output channel, PyTorch's ``_weight_int8pack_mm``.

    Ŵ[n, k] = s[n] · Q[n, k],   Q ∈ [−127, 127] (int8),   s[n] = max_k |W[n, k]| / 127

(symmetric per-channel quantization, as in gpt-fast's ``WeightOnlyInt8QuantHandler``; a search over
clipping ratios c·max|W| picked c = 1 for every row of SmolLM2 tried, so there is none). The kernel
computes y = (x · Qᵀ) ⊙ s in the compute dtype, reading one byte per weight instead of four.
"""

from __future__ import annotations

import torch

from .base import QuantLinear, cat_bias, check_cat

#: the kernel reads past the end of a row whose length is not a multiple of 4 (segfault in torch 2.13)
K_MULTIPLE = 8


class Int8Linear(QuantLinear):
    """y = x · (s ⊙ Q)ᵀ + b with Q int8 (out, in) and s (out,) in the compute dtype."""

    dense_min_rows = 128  # measured crossover on a 2-core AVX2 machine, docs/quantization.md

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        n, k = qweight.shape
        if k % K_MULTIPLE:
            raise ValueError(f"int8 weights need in_features divisible by {K_MULTIPLE}; got {k}")
        if scales.shape != (n,):
            raise ValueError(f"scales have shape {tuple(scales.shape)}, expected ({n},)")
        super().__init__(k, n, bias)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.detach().to(compute_dtype).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantize a float (out, in) weight with one symmetric scale per output row."""
        w = weight.detach().float()  # (N, K)
        scales = w.abs().amax(dim=1) / 127.0  # (N,)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: any scale is exact
        scales = scales.to(compute_dtype).float()  # rounded first, so the codes fit the scale the kernel will use
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, bias, compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)  # (M, N)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        q, s = self.qweight[start:stop], self.scales[start:stop]
        return (q.to(torch.float32) * s.to(torch.float32)[:, None]).to(dtype)  # (R, K)

    @classmethod
    def cat_out(cls, mods: list[Int8Linear]) -> Int8Linear:
        """One layer computing the concatenation of the layers' outputs (e.g. fused q/k/v)."""
        check_cat(mods, cls)
        return cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]), cat_bias(mods),
                   mods[0].compute_dtype)
