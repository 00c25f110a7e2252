"""How the K/V pool stores a cached row (one token of one KV head): float32/float16/bfloat16, or quantized.

The quantized formats are llama.cpp's KV cache types (``-ctk q8_0``, ``-ctk q4_0``): a row of ``hd`` values is
hd/32 GGUF blocks, each an IEEE-half scale d and 32 codes,

- ``q8_0``: 34 bytes a block, x ≈ d·q with q = round(x/d) ∈ [−127, 127], d = max|x|/127;
- ``q4_0``: 18 bytes a block, x ≈ d·(n − 8) with n ∈ [0, 15] packed two to a byte (element j in the low
  nibble of byte j, element j+16 in its high nibble), d = −m/8 for m the element of largest magnitude.

For hd = 64 a float16 row is 128 bytes, a q8_0 row 68 (1.9× the tokens in the same memory), a q4_0 row 36
(3.6×). Where hd is a multiple of 64, quantized rows are stored rotated by the orthonormal Hadamard matrix H of
size 64 (block-diagonal over the head; QuaRot, Ashkboos et al. 2024; llama.cpp's ``attn_rot``): H spreads the few
large channels of K (and V) over all 64, so one scale per 32 values fits them far better. Attention is unchanged,
(qH)·(kH)ᵀ = q·kᵀ and softmax(·)·(VH)·H = softmax(·)·V, so queries are rotated before and outputs after.

A quantized pool is a uint8 tensor (…, row_bytes); rows are quantized as they are written (the C
kernels' ``ak_quantize_kv_rows``, or the PyTorch code below on other devices, rounding exactly as ggml's
reference quantizers) and dequantized where they are read (the C paged attention widens each row once; the
PyTorch paths dequantize the gathered rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32  # values per quantized block


@dataclass(frozen=True)
class KVFormat:
    name: str  # "float16", "q8_0", ...
    storage: torch.dtype  # the pool tensor's dtype (uint8 for quantized rows)
    code: int  # the C kernels' kv_type: 0 float32, 1 float16, 2 q8_0, 3 q4_0; -1: none (bfloat16)
    block_bytes: int = 0  # bytes of one block of QK values; 0: not quantized

    @property
    def quantized(self) -> bool:
        return self.block_bytes > 0

    def row_width(self, hd: int) -> int:
        """The pool's last dimension for rows of ``hd`` values: hd, or the row's bytes when quantized."""
        if not self.quantized:
            return hd
        if hd % QK:
            raise ValueError(f"a {self.name} KV cache needs a head dimension that is a multiple of {QK}, got {hd}")
        return hd // QK * self.block_bytes

    def rotates(self, hd: int) -> bool:
        """Whether rows of ``hd`` values are stored Hadamard-rotated (quantized, hd a multiple of 64)."""
        return self.quantized and hd % 64 == 0

    def row_bytes(self, hd: int) -> int:
        return self.row_width(hd) * self.storage.itemsize

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (…, hd) → the pool's rows (…, row_width): converted, or quantized (exactly ggml's rounding)."""
        if not self.quantized:
            return x.to(self.storage)
        hd = x.shape[-1]
        lead = x.shape[:-1]
        width = self.row_width(hd)
        if x.device.type == "cpu" and x.numel():
            from ..kernels import library

            lib = library()
            if lib is not None:
                xf = x.detach().to(torch.float32).contiguous()
                out = torch.empty(*lead, width, dtype=torch.uint8)
                rc = lib.ak_quantize_kv_rows(self.code, xf.data_ptr(), out.data_ptr(), xf.numel() // hd, hd)
                if rc:
                    raise RuntimeError(f"ak_quantize_kv_rows failed (code {rc})")
                return out
        return self._quantize_torch(x.to(torch.float32).reshape(*lead, hd // QK, QK)).reshape(*lead, width)

    def _quantize_torch(self, b: torch.Tensor) -> torch.Tensor:
        """Blocks (…, QK) float32 → (…, block_bytes) uint8."""
        if self.name == "q8_0":
            d = b.abs().amax(-1, keepdim=True) / 127
            y = b * torch.where(d > 0, 1 / d, torch.zeros_like(d))
            codes = (y.sign() * (y.abs() + 0.5).floor()).to(torch.int8).view(torch.uint8)  # C's roundf: half away from 0
        else:  # q4_0
            m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
            d = m / -8
            n = (b * torch.where(d != 0, 1 / d, torch.zeros_like(d)) + 8.5).trunc().clamp_(max=15).to(torch.uint8)
            codes = n[..., :QK // 2] | (n[..., QK // 2:] << 4)
        scale = d.to(torch.float16).view(torch.uint8)  # (…, 2): the half's bytes, little-endian
        return torch.cat((scale, codes), dim=-1)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The pool's rows (…, row_width) → values (…, hd) of ``dtype``."""
        if not self.quantized:
            return rows if rows.dtype == dtype else rows.to(dtype)
        lead, width = rows.shape[:-1], rows.shape[-1]
        nb = width // self.block_bytes
        b = rows.reshape(*lead, nb, self.block_bytes)
        d = b[..., :2].contiguous().view(torch.float16).to(dtype)  # (…, nb, 1)
        if self.name == "q8_0":
            q = b[..., 2:].contiguous().view(torch.int8).to(dtype)
        else:
            codes = b[..., 2:]
            q = torch.cat((codes & 15, codes >> 4), dim=-1).to(dtype) - 8
        return (q * d).reshape(*lead, nb * QK)


def hadamard64(x: torch.Tensor, native: bool = True) -> torch.Tensor:
    """x (…, hd), hd a multiple of 64 → x·H per 64 values, H the orthonormal Sylvester–Hadamard matrix (its own
    inverse), by the fast Walsh–Hadamard butterflies in the order of the C decode step's (bit-identical results;
    ``native``: float32 CPU tensors through the C kernels' ``ak_hadamard64`` where they are built)."""
    lead, hd = x.shape[:-1], x.shape[-1]
    if native and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and hd % 64 == 0:
        from ..kernels import library

        lib = library()
        if lib is not None:  # the C butterflies: the same floats, without a tensor per stage
            out = torch.empty(x.shape, dtype=torch.float32)
            out.copy_(x)
            if lib.ak_hadamard64(out.data_ptr(), out.numel(), torch.get_num_threads()):
                raise RuntimeError(f"ak_hadamard64 failed on {tuple(x.shape)}")
            return out
    y = x.reshape(-1, hd // 64, 64)
    for h in (1, 2, 4, 8, 16, 32):
        y = y.view(y.shape[0], y.shape[1], 64 // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], y.shape[1], 64)
    return (y * 0.125).reshape(*lead, hd)


FORMATS = {f.name: f for f in (
    KVFormat("float32", torch.float32, 0), KVFormat("float16", torch.float16, 1), KVFormat("bfloat16", torch.bfloat16, -1),
    KVFormat("q8_0", torch.uint8, 2, 2 + QK), KVFormat("q4_0", torch.uint8, 3, 2 + QK // 2))}
ALIASES = {"int8": "q8_0", "int4": "q4_0"}  # the and vLLM-style names


def kv_format(spec: KVFormat | torch.dtype | str) -> KVFormat:
    """A KV format from its name ("float16", "q8_0", "int8" …), a float dtype, or itself."""
    if isinstance(spec, KVFormat):
        return spec
    name = str(spec).removeprefix("torch.") if isinstance(spec, torch.dtype) else ALIASES.get(spec, spec)
    if name not in FORMATS:
        raise ValueError(f"unknown KV cache format {spec!r}: one of {sorted(FORMATS) + sorted(ALIASES)}")
    return FORMATS[name]
