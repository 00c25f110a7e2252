"""Linear layers that keep a GGUF file's blocks as they are and multiply with our own kernels.

Every common GGUF block type stays quantized in memory: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and the
K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256), one row each of :data:`BLOCK_TYPES` (and of the C kernels'
table, attnkit/kernels/kernels.c, checked against each other). PyTorch's weight-only CPU kernels are
compute-bound at batch 1; attnkit's kernels (:mod:`attnkit.kernels`) instead quantize the activations to 8 bits
(one scale per 32 values, per 256 for the K-quants) and take integer dot products on the blocks (llama.cpp's
method), so a decode step is bound by the 4.5–8.5 bits per weight it reads. With no C compiler the layers fall back to gguf-py's dequantizers +
``F.linear`` (correct, slower).

The engine's prompt rows take the dense matrix product on the weight decoded into a reused buffer where the CPU
multiplies bfloat16 in hardware or the type's integer product is the slower one (row layout of a type without
:attr:`BlockType.integer_prompts`), else the integer kernels: on an AVX2 machine (Zen 3, 2 threads) a 512-token prompt of a 1B Q4_K_M runs at 78
tok/s through them against 64 through float32 BLAS. Outside the engine, batches of more rows than
:attr:`GGUFBlockLinear.kernel_max_rows` (8) take the dense product.
That product runs in :attr:`GGUFBlockLinear.dense_dtype`: float32, or bfloat16 (inputs rounded to bf16, float32
sums, the bf16 result widened to float32) — 2–3× faster where the CPU has bf16 hardware (AVX512-BF16, AMX;
:func:`attnkit.kernels.native_bf16`), which is what ``InferenceOptions``' ``matmul_dtype="auto"`` picks there.

On interleaved blocks of every type (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K) with AVX-512 VNNI the engine's prompt rows take neither: an integer
matrix product on 16 rows at a time (kernels/gemm.c, :attr:`GGUFBlockLinear.int8_prompts`).

Where the kernels have a product on them the blocks are kept with rows interleaved (:func:`interleave`): the same
bytes, permuted within each group of rows, so that one vector product covers weights of several rows and one float
FMA applies a block column's scales for all of them. With AVX2 (every type but Q6_K) groups of four, 16 bytes of
each row at a time (the legacy types and Q8_0 ~2× the row layout's products at 4–32 activation rows and 1.2–1.9× at
one; Q4_K 1.15–1.2×, Q5_K ~1.08×); with AVX-512 VNNI (every type) groups of sixteen, 4 bytes of each row at a time
(:func:`group_rows`): a load is 4 weights of each of 16 rows, gemm.c's panel as it lies, so the decode kernel needs
no transposes and serves a batch of any size (docs/performance.md, session 23).
``blocks`` then holds that layout; :meth:`GGUFBlockLinear.row_blocks` gives GGUF's own.

The layers reach the kernels through PyTorch operators (:mod:`attnkit.kernels.ops`: ``torch.ops.attnkit.block_mm``,
``block_dequantize``, ``block_rows``), so ``torch.compile`` traces a GGUF layer, and a GGUF model, without a graph
break.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import library, native_bf16
from ..kernels.ops import block_dequantize, block_mm, block_rows, check_ids, compile_constant
from ..nn.fused import ConcatLinear
from ..nn.scratch import release, reused
from .frozen_grad import frozen_linear, tiled_product
from .row_kernel import current_rows
from .weight_memory import empty_weights, empty_weights_like


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type the C kernels multiply (a row of attnkit/kernels/kernels.c's TYPES): ggml's type id, a
    block's weights and bytes, and its fields as stored with rows interleaved in fours (x4_fields; AVX2) or sixteens
    (x16_fields; AVX-512 VNNI), (offset, bytes, granule) each, in the order they lie in a block column: the group's
    rows' bytes of a field alternate granule by granule (:func:`interleave`)."""

    name: str
    ggml_id: int
    block_elems: int
    block_bytes: int
    x4_fields: tuple[tuple[int, int, int], ...]
    halves: tuple[int, ...]  # where its fp16 scales (d, m / dmin) lie in a block
    # the engine's prompt rows take the integer product where the CPU has no bf16 hardware: measured faster than
    # decoding + float32 BLAS there for Q4_K and Q5_K (1B Q4_K_M, 512-token prompt, AVX2: 78 vs 64 tok/s; Q5_K_M
    # 73 vs 65); for Q6_K 60 vs 64, but its short prompts are 3× faster (32 tokens: 0.53 s to the first token,
    # while the dense product decodes every weight however few the rows); for Q8_0 52 vs 65 (kept dense)
    integer_prompts: bool = False
    # the fields in groups of 16 rows, where a build of the kernels interleaves this type so (AVX-512 VNNI)
    x16_fields: tuple[tuple[int, int, int], ...] | None = None


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18, ((0, 2, 2), (2, 16, 16)), (0,), x16_fields=((0, 2, 2), (2, 16, 4))),  # w = d·(q − 8): d, qs
    BlockType("Q4_1", 3, 32, 20, ((0, 2, 2), (2, 2, 2), (4, 16, 16)), (0, 2),  # w = d·q + m: d, m, qs
              x16_fields=((0, 2, 2), (2, 2, 2), (4, 16, 4))),
    BlockType("Q5_0", 6, 32, 22, ((0, 2, 2), (2, 4, 4), (6, 16, 16)), (0,),  # w = d·(q − 16): d, qh, qs
              x16_fields=((0, 2, 2), (2, 4, 4), (6, 16, 4))),
    BlockType("Q5_1", 7, 32, 24, ((0, 2, 2), (2, 2, 2), (4, 4, 4), (8, 16, 16)), (0, 2),  # w = d·q + m: d, m, qh, qs
              x16_fields=((0, 2, 2), (2, 2, 2), (4, 4, 4), (8, 16, 4))),
    BlockType("Q8_0", 8, 32, 34, ((0, 2, 2), (2, 32, 16)), (0,), x16_fields=((0, 2, 2), (2, 32, 4))),  # w = d·q: d, qs
    # w = d·sc·q − dmin·m: d, dmin, scales, [qh,] qs
    BlockType("Q4_K", 12, 256, 144, ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 16)), (0, 2), True,
              ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4))),
    BlockType("Q5_K", 13, 256, 176, ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 16), (48, 128, 16)), (0, 2), True,
              ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4))),
    # w = d·sc·(q − 32): ql[128], qh[64], scales[16], d; interleaved d, scales, then qh and ql of each half in turn
    BlockType("Q6_K", 14, 256, 210, ((208, 2, 2), (192, 16, 1), (128, 32, 16), (0, 64, 16), (160, 32, 16), (64, 64, 16)),
              (208,), True, ((208, 2, 2), (192, 16, 1), (128, 64, 4), (0, 128, 4))),
)}
NATIVE_TYPES = frozenset(BLOCK_TYPES)
X4_FLAG = 0x100  # the kernels' kind for a type's blocks with rows interleaved (in fours or sixteens): ggml id | X4_FLAG


def _kernels():
    """library(), checked once against BLOCK_TYPES (a type's size or interleaved fields changed on one side only
    would silently misread every block)."""
    lib = library()
    if lib is not None and not getattr(lib, "_attnkit_types_checked", False):
        e, b, f = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int * 24)()
        for t in BLOCK_TYPES.values():
            if lib.ak_type_info(t.ggml_id, ctypes.byref(e), ctypes.byref(b)) or (e.value, b.value) != (t.block_elems, t.block_bytes):
                raise RuntimeError(f"attnkit's C kernels disagree with BLOCK_TYPES on {t.name}")
            n = lib.ak_type_x4_fields(t.ggml_id, f, 8)
            fields = tuple((f[3 * i], f[3 * i + 1], f[3 * i + 2]) for i in range(n))
            rows = lib.ak_type_x4_rows(t.ggml_id)
            want = t.x16_fields if rows == 16 else t.x4_fields
            if n >= 0 and (rows not in (4, 16) or fields != want):
                raise RuntimeError(f"attnkit's C kernels interleave {t.name} as {fields} in groups of {rows} rows, "
                                   f"BLOCK_TYPES as {want}")
        lib._attnkit_types_checked = True
    return lib


@compile_constant
def _have_kernels() -> bool:
    """Whether the C kernels are here (:func:`_kernels`), a constant to ``torch.compile``: the forward's one question
    about the library, so that a compiled model traces through it to the operators of :mod:`attnkit.kernels.ops`."""
    return _kernels() is not None


@compile_constant
def group_rows(kind: str) -> int:
    """Rows a group of ``kind``'s interleaved layout in the built kernels: 16 with AVX-512 VNNI (every type), 4 with
    AVX2."""
    lib = _kernels()
    rows = lib.ak_type_x4_rows(BLOCK_TYPES[kind].ggml_id) if lib is not None else -1
    return rows if rows > 0 else 4


def _layout(kind: str) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """(rows a group, fields) of ``kind``'s interleaved layout here."""
    t, rows = BLOCK_TYPES[kind], group_rows(kind)
    return rows, (t.x16_fields if rows == 16 else t.x4_fields)


def has_x4(kind: str) -> bool:
    """Whether the built kernels multiply ``kind`` on interleaved rows (AVX-512 VNNI: every type, in sixteens; AVX2:
    every type but Q6_K)."""
    lib = _kernels()
    return lib is not None and bool(lib.ak_x4_available()) and lib.ak_type_info(BLOCK_TYPES[kind].ggml_id | X4_FLAG, None, None) == 0


def interleave(blocks: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, nb · block bytes) blocks in GGUF's row layout → rows interleaved in groups of R = :func:`group_rows`
    (n % R == 0), a new tensor.

    For rows R·g .. R·g + R − 1 and block column b the interleaved layout holds each field of the R blocks in turn,
    its bytes alternating between the rows granule by granule (BlockType.x4_fields, or x16_fields): Q4_1 d[4] m[4]
    qs[4][16], so that one 512-bit load holds 16 weights of each of the four rows; Q4_K in sixteens d[16] dmin[16],
    the 12 scale bytes a 32-bit word of each row at a time, then the quants 4 bytes of each row at a time (a load:
    4 bytes of each of 16 rows). A permutation within each group of rows.
    """
    t = BLOCK_TYPES[kind]
    R, fields = _layout(kind)
    n, row = blocks.shape
    lib = _kernels()
    if lib is not None and blocks.is_contiguous() and blocks.device.type == "cpu":  # one pass in C (kernels/repack.c)
        out = empty_weights_like(blocks) if out is None else out
        packed = (ctypes.c_int * (3 * len(fields)))(*(v for f in fields for v in f))
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.ak_interleave.argtypes = [vp, vp, i, i, i, vp, i, i, i]
        if lib.ak_interleave(blocks.data_ptr(), out.data_ptr(), n, row, t.block_bytes, packed, len(fields), R,
                             torch.get_num_threads()):
            raise ValueError(f"cannot interleave {kind} blocks of shape {tuple(blocks.shape)}")
        return out
    if out is not None:
        return out.copy_(interleave(blocks, kind))
    b = blocks.reshape(n // R, R, row // t.block_bytes, t.block_bytes).transpose(1, 2)  # (G, nb, R rows, bb)
    parts = []
    for off, width, g in fields:
        f = b[..., off:off + width].reshape(*b.shape[:3], width // g, g).transpose(2, 3)  # (G, nb, width/g, R, g)
        parts.append(f.reshape(*b.shape[:2], R * width))
    return torch.cat(parts, dim=-1).reshape(n, row)


def deinterleave(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The inverse of :func:`interleave`: GGUF's row layout again."""
    t = BLOCK_TYPES[kind]
    R, fields = _layout(kind)
    n, row = blocks.shape
    c = blocks.reshape(n // R, row // t.block_bytes, R * t.block_bytes)  # (G, nb, R · bb)
    rows = torch.empty(*c.shape[:2], R, t.block_bytes, dtype=blocks.dtype)  # (G, nb, R, bb)
    at = 0
    for off, width, g in fields:
        f = c[..., R * at:R * (at + width)].reshape(*c.shape[:2], width // g, R, g).transpose(2, 3)
        rows[..., off:off + width] = f.reshape(*c.shape[:2], R, width)
        at += width
    return rows.transpose(1, 2).reshape(n, row)  # (G, R, nb, bb) → rows


class GGUFBlockLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W stored as GGUF blocks: ``blocks`` (out, in/32 · block bytes) uint8."""

    kernel_max_rows = 8  # more rows (prefill) → dequantize + BLAS, whose float products round nothing to 8 bits
    decode_max_rows = 64  # decode rows the C decode step takes on interleaved blocks (kernel_product)

    def __init__(self, blocks: torch.Tensor, kind: str, in_features: int, bias: torch.Tensor | None = None,
                 interleaved: bool | None = None, packed: bool = False) -> None:
        """``blocks`` in GGUF's row layout; ``interleaved`` (None: where the kernels have that layout and
        the rows are a multiple of :func:`group_rows`) keeps them interleaved for the vector products; ``packed``:
        ``blocks`` are interleaved already (kept as they are)."""
        super().__init__()
        if kind not in BLOCK_TYPES:
            raise ValueError(f"GGUF block type {kind!r} has no kernel (supported: {', '.join(BLOCK_TYPES)})")
        t = BLOCK_TYPES[kind]
        if in_features % t.block_elems != 0:
            raise ValueError(f"{kind}: in_features ({in_features}) must be a multiple of the block size {t.block_elems}")
        row = in_features // t.block_elems * t.block_bytes
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row:
            raise ValueError(f"{kind} blocks for {in_features} inputs must be uint8 of shape (out, {row}), "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.dense_dtype = torch.float32  # of the products above kernel_max_rows (set_dense_dtype)
        self.on_release: Callable[[], None] | None = None  # see release_source
        if interleaved is None:
            interleaved = packed or (self.out_features % group_rows(kind) == 0 and has_x4(kind))
        if packed and not interleaved:
            raise ValueError("packed blocks are interleaved: interleaved=False contradicts packed=True")
        if interleaved and self.out_features % group_rows(kind):
            raise ValueError(f"interleaved {kind} blocks need a multiple of {group_rows(kind)} rows, got {self.out_features}")
        if interleaved and _kernels() is not None and not has_x4(kind):
            raise ValueError(f"the C kernels built here have no product on interleaved {kind} blocks")
        self.interleaved = bool(interleaved)
        self._dense_for_prompts: bool | None = None  # set: the caller's choice (dense_for_prompts)
        self._int8_prompts: bool | None = None  # set: the caller's choice (int8_prompts)
        self._gemm_shape: bool | None = None  # gemm_shape(), once asked
        # the caller's blocks may be read-only (a file's mmap): never written, interleaving makes a new tensor
        self.register_buffer("blocks", interleave(blocks, kind) if interleaved and not packed else blocks.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def cat_out(cls, mods: list[GGUFBlockLinear]) -> GGUFBlockLinear:
        """One layer whose outputs are those of ``mods`` in order (fused q/k/v, gate/up)."""
        if len({m.in_features for m in mods}) != 1:
            raise ValueError("fused GGUF layers must share their input size, got "
                             + ", ".join(f"{m.kind} ({m.out_features}×{m.in_features})" for m in mods))
        if len({m.kind for m in mods}) != 1:  # e.g. Q4_K_M's Q4_K q/k with a Q6_K v: one part per matrix
            return ConcatLinear([m.packed() for m in mods])
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
        bias = torch.cat(biases) if any(m.bias is not None for m in mods) else None
        kind, k = mods[0].kind, mods[0].in_features
        if not all(m.out_features % group_rows(kind) == 0 for m in mods) or not has_x4(kind):
            parts = [m.row_blocks() for m in mods]
            blocks = torch.cat(parts, out=empty_weights((sum(len(b) for b in parts), parts[0].shape[1])))
            fused = cls(blocks, kind, k, bias, interleaved=False)
            fused._carry_choices(mods)
            for m in mods:  # copied: the file's pages of the parts are no longer needed
                m.release_source()
            return fused
        # groups of rows never straddle two parts: each part goes into its slice of the fused layout once,
        # straight from the file's mapping when it was loaded in GGUF's layout for this
        out = empty_weights((sum(m.out_features for m in mods), mods[0].blocks.shape[1]))
        at = 0
        for m in mods:
            part = out[at:at + m.out_features]
            part.copy_(m.blocks) if m.interleaved else interleave(m.blocks, kind, out=part)
            m.release_source()
            at += m.out_features
        fused = cls(out, kind, k, bias, interleaved=True, packed=True)
        fused._carry_choices(mods)
        return fused

    def _carry_choices(self, mods: list[GGUFBlockLinear]) -> None:
        """The products the parts were set to (an expert's gate and up: the integer kernel for prompts), where
        they agree."""
        for attr in ("dense_dtype", "_dense_for_prompts", "_int8_prompts"):
            if len({getattr(m, attr) for m in mods}) == 1:
                setattr(self, attr, getattr(mods[0], attr))
        if self._int8_prompts and not self.gemm_shape():
            self._int8_prompts = None

    def packed(self) -> GGUFBlockLinear:
        """This layer with its rows interleaved where the kernels have that layout (self if it is, or
        cannot be)."""
        if self.interleaved or self.out_features % group_rows(self.kind) or not has_x4(self.kind):
            if self.on_release is not None:  # still viewing its source (a file's pages): copied onto huge pages
                self.own_blocks()
            return self
        layer = GGUFBlockLinear(self.blocks, self.kind, self.in_features, self.bias, interleaved=True)
        layer.dense_dtype, layer._dense_for_prompts = self.dense_dtype, self._dense_for_prompts
        layer._int8_prompts = self._int8_prompts
        self.release_source()
        return layer

    @property
    def dense_for_prompts(self) -> bool:
        """Whether the engine's prompt rows take the dense product: where bf16 is native (2–3× float32 there) or the
        integer product is slower than float32 BLAS (the row layout of a type without integer_prompts), else the
        integer kernel — interleaved blocks' products are 1.4–1.6× decoding + float32 BLAS at 512 rows on AVX2
        (Q4_1, 1B shapes; Q8_0 1.0–1.35×, benchmarks/gguf_kernels.py). Derived from the layout unless set: an output
        head or an expert, which sees only a few of a prompt's rows, is set to the integer kernel everywhere."""
        if self._dense_for_prompts is not None:
            return self._dense_for_prompts
        return native_bf16() or not (BLOCK_TYPES[self.kind].integer_prompts or self.interleaved)

    @dense_for_prompts.setter
    def dense_for_prompts(self, dense: bool) -> None:
        self._dense_for_prompts = bool(dense)

    @property
    def int8_prompts(self) -> bool:
        """Whether the engine's prompt rows take the integer matrix product of kernels/gemm.c (8-bit activations as
        the decode kernels quantize them, VNNI dot products on the weights unpacked 16 rows at a time: 1.2–1.6×
        decoding the weights + oneDNN's bf16 product at 512 rows of a 1B's layers on AVX-512 VNNI + BF16, 3.5–4.5× at
        16 rows; benchmarks/gguf_kernels.py) instead of the
        product :attr:`dense_for_prompts` picks (and, but for an expert, a short prompt's rows instead of the integer
        kernel: a 1B Q4_K_M's 32-token prompt 151–186 ms to the first token against 212–244; 2 tokens 52–55 against
        35–52). Where the build has it for this type (interleaved blocks of any
        type with AVX-512 VNNI), 16 | out_features and 256 | in_features (32 | in_features for the 32-weight types),
        unless set; by default
        never for a layer set to the integer kernel for a prompt's few rows (``dense_for_prompts = False``: a head,
        which sees one row a sequence; an expert is set explicitly: it sees top_k / n_experts of a prompt's rows)."""
        if self._int8_prompts is not None:
            return self._int8_prompts
        return self._dense_for_prompts is not False and self.gemm_shape()

    def prompt_kinds_alike(self) -> bool:
        """Whether a short prompt's rows take the same product here as a long prompt's (forward's choice by
        :func:`~attnkit.quant.row_kernel.current_rows`): then the engine may run both kinds in one pass."""
        long_int8 = self.int8_prompts
        if long_int8 != (self._dense_for_prompts is not False and long_int8):
            return False
        return long_int8 or not self.dense_for_prompts

    @int8_prompts.setter
    def int8_prompts(self, on: bool) -> None:
        if on and not self.gemm_shape():
            raise ValueError(f"no integer prompt product here for {self.kind} blocks of {self.out_features}×"
                             f"{self.in_features} (interleaved={self.interleaved})")
        self._int8_prompts = bool(on)

    def gemm_shape(self) -> bool:
        """Whether kernels/gemm.c multiplies this layer's blocks (its type, layout and shape, in this build; fixed
        for the layer, so asked of the library once)."""
        if self._gemm_shape is None:
            lib = _kernels()
            self._gemm_shape = lib is not None and self.interleaved and bool(
                lib.ak_gemm_takes(self.kernel_kind, self.out_features, self.in_features))
        return self._gemm_shape

    def own_blocks(self) -> None:
        """Copy blocks viewed where they lie (a file's mapping, on 4 KiB page-cache pages) into weight memory on
        huge pages (:mod:`.weight_memory`: streamed 10–20% faster), then release their source."""
        self.blocks = empty_weights_like(self.blocks).copy_(self.blocks)
        self.release_source()

    def release_source(self) -> None:
        """Say that the blocks this layer was built from are no longer needed where they lie (a file's pages:
        the loader sets ``on_release`` to drop them from resident memory)."""
        if self.on_release is not None:
            self.on_release()
            self.on_release = None

    @property
    def decode_rows(self) -> int:
        """The most decode rows worth the integer kernel: on interleaved blocks it stays ahead of the dense
        bf16 product up to ~64 rows (benchmarks/gguf_kernels.py), on GGUF's layout up to kernel_max_rows."""
        return max(self.kernel_max_rows, self.decode_max_rows) if self.interleaved else self.kernel_max_rows

    @property
    def kernel_kind(self) -> int:
        """The C kernels' code for this layer's blocks and layout."""
        return BLOCK_TYPES[self.kind].ggml_id | (X4_FLAG if self.interleaved else 0)

    def row_blocks(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks in GGUF's row layout: all rows, or those at the indices ``rows`` (1-D)."""
        if not self.interleaved:
            return self.blocks if rows is None else self.blocks[rows]
        if rows is not None:
            rows = rows.reshape(-1).long()
        if rows is None:
            return deinterleave(self.blocks, self.kind)
        R = group_rows(self.kind)
        groups = self.blocks.view(self.out_features // R, -1)[rows // R]  # (N, R rows' bytes)
        unpacked = deinterleave(groups.view(R * len(rows), -1), self.kind).view(len(rows), R, -1)
        return unpacked[torch.arange(len(rows)), rows % R]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (written into ``out`` when given: a reused buffer of that dtype)."""
        if not _have_kernels() or dtype not in (torch.float32, torch.bfloat16):
            return dequantize_reference(self.row_blocks(), self.kind, self.in_features).to(dtype)
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype)
        if out.dtype != dtype or out.shape != (self.out_features, self.in_features) or not out.is_contiguous():
            raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of shape "
                             f"{(self.out_features, self.in_features)}, got {out.dtype} {tuple(out.shape)}")
        block_dequantize(self.blocks, self.kernel_kind, out)
        return out

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of the weight as float32 or bfloat16 (``out``'s dtype), written into ``out`` (stop −
        start, in): the tiles of :mod:`attnkit.quant.frozen_grad`. Interleaved blocks are cut at multiples of 4 rows."""
        if not 0 <= start < stop <= self.out_features or out.shape != (stop - start, self.in_features) \
                or out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
            raise ValueError(f"dequantize_rows: rows [{start}, {stop}) of {self.out_features} into a contiguous float32 "
                             f"or bfloat16 ({stop - start}, {self.in_features}) tensor; got {out.dtype} {tuple(out.shape)}")
        if not _have_kernels():
            rows = torch.arange(start, stop)
            return out.copy_(dequantize_reference(self.row_blocks(rows), self.kind, self.in_features))
        R = group_rows(self.kind) if self.interleaved else 1
        if start % R or stop % R:
            raise ValueError(f"dequantize_rows: interleaved {self.kind} blocks are cut at multiples of {R} rows, got "
                             f"[{start}, {stop})")
        block_dequantize(self.blocks[start:stop], self.kernel_kind, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GGUFBlockLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu":  # QLoRA: only x gets a gradient
            return frozen_linear(self, x)
        x2 = x.reshape(-1, self.in_features)
        path = "none" if not _have_kernels() or x.device.type != "cpu" or x.requires_grad else self._path(x2)
        if path == "none":
            y = F.linear(x2, self.dequantize(x.dtype))
        elif path == "gemm":
            y = self._kernel(x2, gemm=True)  # a short prompt's rows too (TTFT −25% at 32 tokens), not an expert's
        elif path == "dense":
            rows = current_rows()
            dt = torch.bfloat16 if torch.bfloat16 in (x2.dtype, self.dense_dtype) else torch.float32
            if rows is None:  # outside the engine (an evaluation): by tiles, the training forward's arithmetic in
                y = tiled_product(self, x2.to(dt))  # its dtype, and no layer-sized buffer (it set QLoRA's peak)
            else:  # compute-bound: a dense product on the weight decoded into a reused buffer
                y = F.linear(_batch_rows(x2.to(dt)),
                             self.dequantize(dt, out=_scratch(self.out_features, self.in_features, dt)))[:x2.shape[0]]
        else:
            y = self._kernel(x2)
        return self._finish(y.to(x.dtype), x.shape[:-1])

    def _path(self, x2: torch.Tensor) -> str:
        """The product the forward takes for these rows: "gemm" (the integer matrix product), "dense" (a float
        product on the decoded weight) or "kernel" (the integer decode kernel). The engine sets what the rows are
        (:func:`current_rows`), and the product follows that, never how many rows share the step; a short prompt's
        rows take the integer product too (decoding every weight for them would cost more)."""
        rows = current_rows()
        if (rows == "prompt" or rows == "short-prompt" and self._dense_for_prompts is not False) and self.int8_prompts:
            return "gemm"
        dense = x2.shape[0] > self.kernel_max_rows if rows is None else rows == "prompt" and self.dense_for_prompts
        return "dense" if dense else "kernel"

    def gated_product(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """act(x·W_gateᵀ) ⊙ x·W_upᵀ for this layer as a fused [gate | up] projection (2·ff outputs), computed in the
        integer kernels' epilogue (ak_gemm_gated / ak_gemv_gated: each output the forward's gate and up products
        through the C decode step's act), so that the (rows, 2·ff) product never lies in memory. ``activation``:
        "silu" (SwiGLU) or "gelu_tanh" (GeGLU). None where the forward would not take an integer kernel (a dense
        product, no kernels, gradients, a bias): the caller then multiplies and applies act itself."""
        act = {"silu": 0, "gelu_tanh": 1}.get(activation)
        if (act is None or not _have_kernels() or self.bias is not None or x.device.type != "cpu" or x.requires_grad
                or x.shape[-1] != self.in_features
                or self.out_features % (2 * (group_rows(self.kind) if self.interleaved else 1))):
            return None
        x2 = x.reshape(-1, self.in_features)
        path = self._path(x2)
        if path == "dense":
            return None
        h = self._kernel(x2, gemm=path == "gemm", act=act)
        return h.to(x.dtype).reshape(*x.shape[:-1], h.shape[1])

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ (+ b) through the integer kernel (8-bit activations, a scale per weight block), any number of rows."""
        if not _have_kernels() or x.device.type != "cpu":
            raise RuntimeError("GGUFBlockLinear.kernel_product needs the C kernels and a CPU tensor")
        return self._finish(self._kernel(x.reshape(-1, self.in_features)).to(x.dtype), x.shape[:-1])

    def _kernel(self, x2: torch.Tensor, gemm: bool = False, act: int | None = None) -> torch.Tensor:
        """(m, in) → (m, out) float32 through ak_gemv, or ak_gemm (kernels/gemm.c) with ``gemm``; with ``act`` (0
        SiLU, 1 GELU-tanh) the gated form (m, out / 2) = act(gate)·up of their epilogue (ak_gemv_gated, ak_gemm_gated)."""
        xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
        return block_mm(xf, self.blocks, self.kernel_kind, self.out_features, gemm, -1 if act is None else act)

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


def set_dense_dtype(model: nn.Module, dtype: torch.dtype, int8_prompts: bool | None = None) -> int:
    """Make every GGUFBlockLinear of ``model`` multiply batches above its kernel_max_rows in ``dtype``
    (float32 or bfloat16); ``int8_prompts=False`` also sends the engine's prompt rows there instead of the integer
    product (:attr:`GGUFBlockLinear.int8_prompts`; None leaves each layer's default). Returns how many layers it set."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the dense products of GGUF layers run in float32 or bfloat16, not {dtype}")
    mods = [m for m in model.modules() if isinstance(m, GGUFBlockLinear)]
    for m in mods:
        m.dense_dtype = dtype
        if int8_prompts is False:
            m.int8_prompts = False
    return len(mods)


def to_blocks(model: nn.Module, kind: str = "Q8_0") -> int:
    """Quantize a float model's linear layers (and its LM head) to GGUF ``kind`` blocks in place, so that they run
    on these kernels and the C decode step (a speculative draft beside a GGUF target); returns how many layers."""
    from .gguf_quantize import quantize_rows

    def blocks_of(w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(quantize_rows(w.detach().float().contiguous().numpy(), kind))

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if parent is model and name == "lm_head":
                continue  # the head: output_head below (Llama.logits reads lm_head.weight)
            if type(child) is nn.Linear and child.in_features % BLOCK_TYPES[kind].block_elems == 0:
                bias = None if child.bias is None else child.bias.detach().float()
                setattr(parent, name, GGUFBlockLinear(blocks_of(child.weight), kind, child.in_features, bias))
                n += 1
    emb = getattr(model, "tok_embeddings", None)
    if getattr(model, "output_head", "absent") is None and isinstance(emb, nn.Embedding):
        head = getattr(model, "lm_head", None)
        w = emb.weight if head is None else head.weight
        if w.shape[1] % BLOCK_TYPES[kind].block_elems == 0:  # else the head stays float, as such layers do
            model.output_head = GGUFBlockLinear(blocks_of(w), kind, w.shape[1])
            n += 1
    return n


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
        flat = idx.reshape(-1).to(torch.int64).contiguous()
        if _have_kernels():  # only the rows asked for are decoded, in C, from the head's blocks in either layout
            rows = block_rows(h.blocks, h.kernel_kind, h.out_features, h.in_features, flat)
        else:
            check_ids(flat, h.out_features)
            rows = dequantize_reference(h.row_blocks(flat), h.kind, h.in_features)
        return rows.view(*idx.shape, h.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.head[0].kind} blocks of the output head"


def _batch_rows(x: torch.Tensor) -> torch.Tensor:
    """x, padded with copies of its first row where oneDNN would multiply so few rows by another method than
    a batch's (a matrix-vector product for one bf16 row; other small-matrix kernels below 16 float32 rows), so
    that each row is summed in the same order whatever the row count (tests/test_quant_types.py checks it)."""
    least = 2 if x.dtype == torch.bfloat16 else 16
    if x.shape[0] >= least:
        return x
    return torch.cat([x, x[:1].expand(least - x.shape[0], -1)])


def _scratch(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (n, k) view of one buffer of that dtype reused by every layer (grown to the largest, :mod:`attnkit.nn.scratch`):
    a fresh multi-megabyte tensor per call would cost its page faults every time, and one buffer per layer shape the
    memory of all of them. Each product is done with it before the next begins (one engine thread runs the model)."""
    return reused(f"dense.{dtype}", (n, k), dtype)


def release_scratch() -> None:
    """Free the buffers :func:`_scratch` keeps (the dense products' decoded weights, grown to the largest layer:
    64 MB of float32 for a 1B's gate/up). A training run over a quantized base calls it after each evaluation, so
    that its steps never hold them next to their activations (products outside the engine go by tiles and should
    not grow them)."""
    release("dense.")


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k / block elems · block bytes) valid random blocks (tests, benchmarks; gguf-py quantizes no K-quants):
    random quant and scale bytes, fp16 d / m / dmin of either sign with magnitudes in [0.002, 0.02)."""
    t = BLOCK_TYPES[kind]
    rng = np.random.default_rng(seed)
    nb = k // t.block_elems
    b = rng.integers(0, 256, (n, nb, t.block_bytes), dtype=np.uint8)
    for off in t.halves:
        h = (rng.uniform(0.002, 0.02, (n, nb)) * rng.choice([-1, 1], (n, nb))).astype(np.float16)
        b[..., off:off + 2] = h.view(np.uint8).reshape(n, nb, 2)
    return torch.from_numpy(b.reshape(n, -1))


def dequantize_reference(blocks: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """GGUF row-layout blocks (n, k / block elems · block bytes) → (n, k) float32 through gguf-py's dequantizers
    (no compiler needed; the tests' reference)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = np.ascontiguousarray(blocks.numpy())
    return torch.from_numpy(dequantize(data, GGMLQuantizationType[kind]).reshape(len(data), k).astype(np.float32, copy=False))
