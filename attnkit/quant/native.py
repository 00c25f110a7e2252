"""Linear layers that keep a GGUF file's Q4_1 / Q8_0 blocks as they are and multiply with our own kernel.

PyTorch's weight-only CPU kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) are
compute-bound at batch 1 on an AVX2 machine (see docs/performance.md): slower than reading the
float32 weights. attnkit's kernel (:mod:`attnkit.kernels`) instead quantizes the activations to 8 bits per block of 32
and takes integer dot products on the blocks (llama.cpp's method), so a decode step is bound by
the 4.5 or 8.5 bits per weight it reads. With no C compiler the layers fall back to dequantize +
``F.linear`` (correct, slower).

Batches of more rows than :attr:`GGUFBlockLinear.kernel_max_rows` (8: prefill, large decode batches) decode the weight into a reused buffer and use the dense matrix product, which is faster once the
work is compute-bound. That product runs in :attr:`GGUFBlockLinear.dense_dtype`: float32, or bfloat16
(inputs rounded to bf16, float32 sums, the bf16 result widened to float32) — 2–3× faster where the CPU has bf16 hardware
(AVX512-BF16, AMX; :func:`attnkit.kernels.native_bf16`), which is what ``InferenceOptions``'
``matmul_dtype="auto"`` picks there.

Where the CPU has AVX-512 VNNI the blocks are kept with rows interleaved in fours
(:func:`interleave`, ``attnkit/kernels/interleaved.c``): the same bytes, permuted within each group
of four rows, so that one 512-bit product covers a block of four rows. ``blocks`` then holds that
layout; :meth:`GGUFBlockLinear.row_blocks` gives GGUF's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import library

KINDS = {"Q4_1": 0, "Q8_0": 1}  # the kernels' codes; + 2 for the interleaved layout
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
ACT_BLOCK_BYTES = 40


def _fields(kind: str) -> list[int]:
    """Byte widths of one block's fields: (d, min, quants) for Q4_1, (d, quants) for Q8_0."""
    return [2, 2, 16] if kind == "Q4_1" else [2, 32]


def interleave(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, nb · block bytes) blocks in GGUF's row layout → rows interleaved in fours (n % 4 == 0).

    For rows 4g..4g+3 and block column b the interleaved layout holds each field of the four blocks
    side by side: Q4_1 d[4] min[4] qs[4][16] (80 bytes), Q8_0 d[4] qs[4][32] (136 bytes).
    """
    n, row = blocks.shape
    bb = BLOCK_BYTES[kind]
    b = blocks.view(n // 4, 4, row // bb, bb).transpose(1, 2)  # (G, nb, 4 rows, bb)
    parts = b.split(_fields(kind), dim=-1)
    return torch.cat([p.reshape(*b.shape[:2], -1) for p in parts], dim=-1).reshape(n, row)


def deinterleave(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The inverse of :func:`interleave`: GGUF's row layout again."""
    n, row = blocks.shape
    bb = BLOCK_BYTES[kind]
    c = blocks.view(n // 4, row // bb, 4 * bb)  # (G, nb, 4 · bb)
    parts = c.split([4 * f for f in _fields(kind)], dim=-1)
    rows = torch.cat([p.reshape(*c.shape[:2], 4, -1) for p in parts], dim=-1)  # (G, nb, 4, bb)
    return rows.transpose(1, 2).reshape(n, row)


class GGUFBlockLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W stored as GGUF blocks: ``blocks`` (out, in/32 · block bytes) uint8."""

    kernel_max_rows = 8  # more rows (prefill) → dequantize + BLAS, whose float products round nothing to 8 bits
    decode_max_rows = 64  # decode rows the C decode step takes on interleaved blocks (kernel_product)

    def __init__(self, blocks: torch.Tensor, kind: str, in_features: int, bias: torch.Tensor | None = None,
                 interleaved: bool | None = None) -> None:
        """``blocks`` in GGUF's row layout; ``interleaved`` (None: where the kernels have that layout and
        the rows are a multiple of 4) keeps them interleaved in fours for the 512-bit products."""
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"GGUF block type {kind!r} has no kernel (supported: {', '.join(KINDS)})")
        if in_features % 32 != 0:
            raise ValueError(f"in_features ({in_features}) must be a multiple of the block size 32")
        row = in_features // 32 * BLOCK_BYTES[kind]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row:
            raise ValueError(f"{kind} blocks for {in_features} inputs must be uint8 of shape (out, {row}), "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.dense_dtype = torch.float32  # of the products above kernel_max_rows (set_dense_dtype)
        if interleaved is None:
            lib = library()
            interleaved = lib is not None and bool(lib.ak_x4_available()) and self.out_features % 4 == 0
        if interleaved and self.out_features % 4:
            raise ValueError(f"interleaved GGUF blocks need a multiple of 4 rows, got {self.out_features}")
        self.interleaved = interleaved
        self.register_buffer("blocks", interleave(blocks, kind) if interleaved else blocks.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def cat_out(cls, mods: list[GGUFBlockLinear]) -> GGUFBlockLinear:
        """One layer whose outputs are those of ``mods`` in order (fused q/k/v, gate/up)."""
        if len({(m.kind, m.in_features) for m in mods}) != 1:
            raise ValueError("fused GGUF layers must share block type and input size")
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
        bias = torch.cat(biases) if any(m.bias is not None for m in mods) else None
        return cls(torch.cat([m.row_blocks() for m in mods]), mods[0].kind, mods[0].in_features, bias)

    @property
    def decode_rows(self) -> int:
        """The most decode rows worth the integer kernel: on interleaved blocks it stays ahead of the dense
        bf16 product up to ~64 rows (benchmarks/gguf_kernels.py), on GGUF's layout up to kernel_max_rows."""
        return max(self.kernel_max_rows, self.decode_max_rows) if self.interleaved else self.kernel_max_rows

    @property
    def kernel_kind(self) -> int:
        """The C kernels' code for this layer's blocks and layout."""
        return KINDS[self.kind] + 2 * self.interleaved

    def row_blocks(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks in GGUF's row layout: all rows, or those at the indices ``rows`` (1-D)."""
        if not self.interleaved:
            return self.blocks if rows is None else self.blocks[rows]
        if rows is None:
            return deinterleave(self.blocks, self.kind)
        groups = self.blocks.view(self.out_features // 4, -1)[rows // 4]  # (N, 4 rows' bytes)
        unpacked = deinterleave(groups.view(4 * len(rows), -1), self.kind).view(len(rows), 4, -1)
        return unpacked[torch.arange(len(rows)), rows % 4]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (written into ``out`` when given: a reused buffer of that dtype)."""
        lib = library()
        if lib is None or dtype not in (torch.float32, torch.bfloat16):
            return _dequantize_torch(self.row_blocks(), self.kind, self.in_features).to(dtype)
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype)
        if out.dtype != dtype or out.shape != (self.out_features, self.in_features) or not out.is_contiguous():
            raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of shape "
                             f"{(self.out_features, self.in_features)}, got {out.dtype} {tuple(out.shape)}")
        lib.ak_dequantize(self.kernel_kind, self.blocks.data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16),
                          self.out_features, self.in_features, torch.get_num_threads())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GGUFBlockLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        lib = library()
        if lib is None or x.device.type != "cpu" or x.requires_grad:
            y = F.linear(x2, self.dequantize(x.dtype))
        elif x2.shape[0] > self.kernel_max_rows:  # compute-bound: a dense product on the weight decoded into a reused buffer
            dt = torch.bfloat16 if torch.bfloat16 in (x2.dtype, self.dense_dtype) else torch.float32
            y = F.linear(x2.to(dt), self.dequantize(dt, out=_scratch(self.out_features, self.in_features, dt)))
        else:
            y = self._kernel(lib, x2)
        return self._finish(y.to(x.dtype), x.shape[:-1])

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ (+ b) through the integer kernel (8-bit activations per block of 32) for any number of rows."""
        lib = library()
        if lib is None or x.device.type != "cpu":
            raise RuntimeError("GGUFBlockLinear.kernel_product needs the C kernels and a CPU tensor")
        return self._finish(self._kernel(lib, x.reshape(-1, self.in_features)).to(x.dtype), x.shape[:-1])

    def _kernel(self, lib, x2: torch.Tensor) -> torch.Tensor:
        """(m, in) → (m, out) float32 through ak_gemv."""
        xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
        m = xf.shape[0]
        y = torch.empty(m, self.out_features)
        lib.ak_gemv(self.kernel_kind, self.blocks.data_ptr(), xf.data_ptr(), y.data_ptr(), m, self.out_features,
                    self.in_features, _act_scratch(m * (self.in_features // 32) * ACT_BLOCK_BYTES),
                    torch.get_num_threads())
        return y

    def _finish(self, y: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        dense = "" if self.dense_dtype == torch.float32 else f", dense_dtype={self.dense_dtype}"
        dense += ", interleaved" if self.interleaved else ""
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{dense}"


def set_dense_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Make every GGUFBlockLinear of ``model`` multiply batches above its kernel_max_rows in ``dtype``
    (float32 or bfloat16); returns how many layers it set."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the dense products of GGUF layers run in float32 or bfloat16, not {dtype}")
    mods = [m for m in model.modules() if isinstance(m, GGUFBlockLinear)]
    for m in mods:
        m.dense_dtype = dtype
    return len(mods)


class GGUFBlockEmbedding(nn.Module):
    """Token embeddings looked up in a tied output head's GGUF blocks: each step decodes only its rows."""

    def __init__(self, head: GGUFBlockLinear) -> None:
        super().__init__()
        self.head = [head]  # shared, not a submodule: the blocks are counted and saved once, as the head's
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (decoded on demand; for code that needs the matrix itself)."""
        return self.head[0].dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.head[0]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= h.out_features):
            raise IndexError(f"token id out of range for a vocabulary of {h.out_features}")
        rows = _dequantize_torch(h.row_blocks(idx.reshape(-1)), h.kind, h.in_features)  # (N, d)
        return rows.view(*idx.shape, h.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.head[0].kind} blocks of the output head"


_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _scratch(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (n, k) view of a buffer reused by every layer of that size and dtype: a fresh multi-megabyte
    tensor per call would cost its page faults every time. (One engine thread runs the model.)"""
    buf = _SCRATCH.get((n * k, dtype))
    if buf is None:
        buf = _SCRATCH[n * k, dtype] = torch.empty(n * k, dtype=dtype)
    return buf.view(n, k)


_ACT: list[torch.Tensor] = []


def _act_scratch(nbytes: int) -> int:
    """Address of a reused buffer of at least ``nbytes`` for the quantized activations."""
    if not _ACT or _ACT[0].numel() < nbytes:
        _ACT[:] = [torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)]
    return _ACT[0].data_ptr()


def _dequantize_torch(blocks: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """The same dequantization in torch ops (no compiler needed; also the tests' reference)."""
    n = blocks.shape[0]
    b = blocks.view(n, k // 32, BLOCK_BYTES[kind])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (n, nb, 1)
    if kind == "Q8_0":
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(n, k)
    mn = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # element j in the low nibble, j + 16 in the high
    return (q * d + mn).reshape(n, k)
