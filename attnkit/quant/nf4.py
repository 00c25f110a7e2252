"""4-bit NormalFloat weights (QLoRA, Dettmers et al. 2023, §3): the base that QLoRA trains through.

    Ŵ[n, 64b + j] = absmax[n, b] · NF4[Q[n, 64b + j]],   absmax[n, b] = max_j |W[n, 64b + j]|

NF4 holds the 16 quantiles of a standard normal, rescaled to [−1, 1] with an exact zero (the paper's eq. 4; the
values bitsandbytes uses); each block of 64 weights along a row has its own float32 absmax (no double
quantization). Codes are packed two per byte, the first in the high nibble, as bitsandbytes packs them, so that
codes and scales equal ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``'s.
There is no integer kernel: products dequantize tiles of rows (:mod:`attnkit.quant.frozen_grad`), which is what
training over a frozen base needs; for fast inference use GGUF blocks or int4.
"""

from __future__ import annotations

import torch

from .base import QuantLinear, cat_bias, check_cat
from .frozen_grad import tiled_product

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
BLOCK = 64


class NF4Linear(QuantLinear):
    """y = x·Ŵᵀ + b with Ŵ in NF4 blocks of 64: ``packed`` (out, in/2) uint8, ``absmax`` (out, in/64) float32."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"NF4 codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
        n, k = packed.shape[0], packed.shape[1] * 2
        if k % BLOCK or absmax.shape != (n, k // BLOCK):
            raise ValueError(f"NF4 of {n}×{k} needs in_features divisible by {BLOCK} and absmax of shape "
                             f"({n}, {k // BLOCK}); got {tuple(absmax.shape)}")
        super().__init__(k, n, bias)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("absmax", absmax.detach().float().contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        """Round each weight, divided by its block's absmax, to the nearest NF4 value."""
        w = weight.detach().float()
        n, k = w.shape
        if k % BLOCK:
            raise ValueError(f"NF4 needs in_features divisible by {BLOCK}; got {k}")
        blocks = w.view(n, k // BLOCK, BLOCK)
        absmax = blocks.abs().amax(dim=-1)  # (N, K/64)
        scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
        codes = torch.bucketize(scaled, (NF4[1:] + NF4[:-1]) / 2).view(n, k).to(torch.uint8)  # nearest value
        return cls((codes[:, 0::2] << 4) | codes[:, 1::2], absmax, bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(rows, in) uint8 codes 0–15 of rows [start, stop)."""
        p = self.packed[start:stop]
        return torch.stack([p >> 4, p & 15], dim=-1).view(p.shape[0], self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        q = self.codes(start, stop)
        w = NF4[q.long()].view(q.shape[0], -1, BLOCK) * self.absmax[start:stop, :, None]  # (R, K/64, 64)
        return w.view(q.shape[0], self.in_features).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_product(self, x)  # (M, N)

    @classmethod
    def cat_out(cls, mods: list[NF4Linear]) -> NF4Linear:
        """One layer computing the concatenation of the layers' outputs (e.g. fused q/k/v)."""
        check_cat(mods, cls)
        return cls(torch.cat([m.packed for m in mods]), torch.cat([m.absmax for m in mods]), cat_bias(mods))
