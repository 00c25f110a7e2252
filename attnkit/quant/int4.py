"""Int4 weight-only linear layer: group-wise scales and zeros, PyTorch's ``_weight_int4pack_mm_for_cpu``.

For each output row n and group g of ``group_size`` consecutive inputs (Frantar et al. 2023, GPTQ §3;
the layout of gpt-fast's ``WeightOnlyInt4QuantHandler`` and of llama.cpp's Q4_0/Q4_1 blocks):

    Ŵ[n, k] = s[n, g] · (Q[n, k] − 8) + z[n, g],   Q ∈ {0, …, 15},   g = k // group_size

From float weights, asymmetric min/max per group: s = (max − min) / 15, z = min + 8s, Q = round((W − min) / s).
GGUF blocks map exactly (group 32): Q4_0 (w = d·(q − 8)) → s = d, z = 0; Q4_1 (w = d·q + m) → s = d, z = m + 8d.

The kernel wants the codes packed two per byte in its own tiled order (``_convert_weight_to_int4pack_for_cpu``,
which depends on the CPU's vector width) and ``scales_and_zeros`` as (in/group, out, 2). ``out`` must be a
multiple of 16, so other sizes are padded with zero rows and the output sliced.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import QuantLinear, cat_bias, check_cat

GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 16


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 → the kernel's packed (N, K/2) uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _unpack_tiled(packed: torch.Tensor, n: int, k: int, block_n: int, halves: bool, start: int = 0,
                  stop: int | None = None) -> torch.Tensor:
    """Invert ``pack`` (rows [start, stop) of n) for tiles of ``block_n`` rows stored (K, block_n/2): byte j of
    a k holds rows (j, j + block_n/2) when ``halves`` (AVX2/AVX-512 kernels), (2j, 2j+1) otherwise and in a
    last partial tile."""
    stop = n if stop is None else stop
    flat = packed.reshape(-1)
    full = n // block_n
    t0, t1 = start // block_n, min(-(-stop // block_n), full)  # the full tiles holding [start, stop)
    parts = []
    if t1 > t0:
        p = flat[t0 * k * block_n // 2 : t1 * k * block_n // 2].view(t1 - t0, k, block_n // 2)
        lo, hi = p & 15, p >> 4
        u = torch.cat([lo, hi], -1) if halves else torch.stack([lo, hi], -1).view(t1 - t0, k, block_n)
        parts.append(u.transpose(1, 2).reshape((t1 - t0) * block_n, k))  # (rows, K)
    if stop > full * block_n:
        tail = n - full * block_n
        p = flat[full * k * block_n // 2 :].view(k, tail // 2)
        parts.append(torch.stack([p & 15, p >> 4], -1).view(k, tail).t())  # (tail, K)
    first = min(t0, full) * block_n
    return torch.cat(parts)[start - first : stop - first].contiguous()


def _unpack_by_kernel(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Layout-agnostic fallback: multiply the identity by Ŵ with s = 1, z = 8, i.e. Ŵ = Q (exact in bf16)."""
    eye = torch.eye(k, dtype=torch.bfloat16)
    sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(k // 32, n, 2).contiguous()
    return torch._weight_int4pack_mm_for_cpu(eye, packed, 32, sz).t().to(torch.uint8).contiguous()


@functools.cache
def _layout() -> tuple[int, bool] | None:
    """The packing this build and CPU use, found by packing a probe (None: unknown, use the kernel)."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (112, 64), generator=g, dtype=torch.uint8)  # one or more full tiles + a partial one
    packed = pack(probe)
    for block_n, halves in ((64, True), (32, True), (32, False), (64, False)):
        if torch.equal(_unpack_tiled(packed, 112, 64, block_n, halves), probe):
            return block_n, halves
    return None


def unpack(packed: torch.Tensor, n: int, k: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The kernel's packed (N, K/2) uint8 → (stop − start, K) codes 0..15 of rows [start, stop)."""
    layout = _layout()
    if layout is None:
        return _unpack_by_kernel(packed, n, k)[start:stop]
    return _unpack_tiled(packed, n, k, *layout, start=start, stop=stop)


class Int4Linear(QuantLinear):
    """y = x · Ŵᵀ + b with Ŵ = s·(Q − 8) + z group-wise; see the module docstring."""

    dense_min_rows = 256  # measured crossover on a 2-core AVX2 machine, docs/quantization.md

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        n_pad, half_k = packed.shape
        k = 2 * half_k
        if scales_and_zeros.shape != (k // group_size, n_pad, 2):
            raise ValueError(f"scales_and_zeros have shape {tuple(scales_and_zeros.shape)}, "
                             f"expected {(k // group_size, n_pad, 2)}")
        super().__init__(k, out_features, bias)
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """codes (N, K) in 0..15, scales and zeros (N, K/group_size): Ŵ = s·(Q − 8) + z."""
        check_group(codes.shape[1], group_size)
        n, k = codes.shape
        if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
                             f"{(n, k // group_size)} for codes {(n, k)} and group size {group_size}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise ValueError("int4 codes must lie in 0..15")
        pad = -n % N_MULTIPLE
        codes = F.pad(codes.to(torch.uint8), (0, 0, 0, pad), value=8)  # (N+pad, K); pad rows: Ŵ = 0
        s, z = (F.pad(t.float(), (0, 0, 0, pad)) for t in (scales, zeros))  # (N+pad, K/G)
        sz = torch.stack([s.t(), z.t()], dim=-1).to(compute_dtype)  # (K/G, N+pad, 2)
        return cls(pack(codes), sz, group_size, n, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """Asymmetric min/max quantization of a float (out, in) weight in groups of ``group_size`` inputs."""
        check_group(weight.shape[1], group_size)
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)  # (N, K/G)
        s = (hi - lo) / 15
        s = torch.where(s > 0, s, torch.ones_like(s)).to(compute_dtype).float()  # a constant group: any scale works
        z = (lo + 8 * s).to(compute_dtype).float()
        q = torch.round((w - (z - 8 * s)[..., None]) / s[..., None]).clamp_(0, 15)  # codes for the rounded s, z
        return cls.from_codes(q.to(torch.uint8).reshape(n, k), s, z, group_size, bias, compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)  # (M, N+pad)

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop − start, in) uint8 codes 0..15 of output rows [start, stop)."""
        stop = self.out_features if stop is None else stop
        return unpack(self.packed, self.packed.shape[0], self.in_features, start, stop)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, in/group) float32 scales s and zeros z."""
        sz = self.scales_and_zeros[:, : self.out_features].float()  # (K/G, N, 2)
        return sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.out_features if stop is None else stop
        sz = self.scales_and_zeros[:, start:stop].to(torch.float32).transpose(0, 1).unsqueeze(-2)  # (R, K/G, 1, 2)
        w = self.codes(start, stop).to(torch.float32).view(stop - start, -1, self.group_size)  # (R, K/G, G)
        w.sub_(8).mul_(sz[..., 0]).add_(sz[..., 1])
        return w.view(stop - start, self.in_features).to(dtype)

    @classmethod
    def cat_out(cls, mods: list[Int4Linear]) -> Int4Linear:
        """One layer computing the concatenation of the layers' outputs (e.g. fused q/k/v, gate/up)."""
        check_cat(mods, cls)
        if any(m.group_size != mods[0].group_size for m in mods):
            raise ValueError(f"cat_out joins int4 layers of one group size; got {[m.group_size for m in mods]}")
        parts = [m.scales_zeros() for m in mods]
        return cls.from_codes(torch.cat([m.codes() for m in mods]), torch.cat([s for s, _ in parts]),
                              torch.cat([z for _, z in parts]), mods[0].group_size, cat_bias(mods),
                              mods[0].compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def check_group(in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}; got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide in_features {in_features}")
