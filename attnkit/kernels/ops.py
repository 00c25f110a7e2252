"""attnkit's C kernels as PyTorch operators (``torch.library``), so that ``torch.compile`` (and a later backend)
sees each as one operator with a declared schema and output shape, not as opaque Python: the GGUF block products
(attnkit.quant.native's layers) and RMSNorm's one pass a row (attnkit.nn.norm).

    torch.ops.attnkit.block_mm(x, blocks, kind, out_features, gemm=False, act=-1)   # y = x·Ŵᵀ, float32
    torch.ops.attnkit.block_dequantize(blocks, kind, out)                          # out ← Ŵ (float32 or bf16)

``blocks`` are a layer's weight blocks as :class:`~attnkit.quant.native.GGUFBlockLinear` keeps them (``kind``: the
kernels' type id, with ``X4_FLAG`` for rows interleaved), Ŵ their dequantized (out_features, in) weight.
``block_mm`` quantizes each row of x to 8 bits and takes the integer products (the decode kernel, ak_gemv; with
``gemm`` the prompt rows' matrix product, ak_gemm); ``act`` ≥ 0 takes a fused [gate | up] weight and returns
act(x·W_gateᵀ) ⊙ x·W_upᵀ (0 SiLU, 1 GELU-tanh: SwiGLU / GeGLU). Each checks its tensors against the block type
before any C code reads them: a wrong size is a ValueError naming what was expected, never a read past a buffer.

    torch.ops.attnkit.block_rows(blocks, kind, out_features, in_features, idx)   # an embedding lookup
    torch.ops.attnkit.rms_norm(x, weight, eps, out_dtype)   # (y, r): y = x·r·w, r = 1/√(mean(x²) + ε) per row

Registered with ``torch.library``'s schema API (define / impl / register_fake), not ``custom_op``: calling a
``custom_op`` imports ``torch._dynamo``, ~145 MB of resident memory in every process that never compiles.
The module-level functions below are the operators' Python faces (``block_mm(...)`` calls ``torch.ops.attnkit.block_mm``).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import library, train_kernels

ACT_BLOCK_BYTES = 40  # the kernels' scratch for one block of 32 quantized activations

_LIB = torch.library.Library("attnkit", "DEF")  # kept for the process: the operators live as long as it does


def compile_constant(fn):
    """Mark ``fn`` (no tensor arguments, a result fixed for the process) as a constant to ``torch.compile``: what
    ``torch.compiler.assume_constant_result`` does, without importing ``torch._dynamo`` (see above)."""
    fn._dynamo_marked_constant = True
    return fn


_ACT: list[torch.Tensor] = []


def act_scratch(nbytes: int) -> int:
    """Address of a reused buffer of at least ``nbytes`` for the quantized activations."""
    if not _ACT or _ACT[0].numel() < nbytes:
        _ACT[:] = [torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)]
    return _ACT[0].data_ptr()


@functools.cache
def block_shape(kind: int) -> tuple[int, int]:
    """(weights, bytes) of one block of ``kind`` in this build's kernels; ValueError for a kind they lack."""
    lib = library()
    e, b = ctypes.c_int(), ctypes.c_int()
    if lib is None or lib.ak_type_info(kind, ctypes.byref(e), ctypes.byref(b)):
        raise ValueError(f"attnkit's kernels multiply no block type {kind:#x} here")
    return e.value, b.value


def _check_blocks(blocks: torch.Tensor, kind: int, rows: int, k: int, what: str) -> None:
    elems, nbytes = block_shape(kind)
    if k % elems:
        raise ValueError(f"{what}: {k} inputs are not whole blocks of {elems}")
    want = rows * (k // elems) * nbytes
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous() or blocks.numel() != want or blocks.device.type != "cpu":
        raise ValueError(f"{what}: blocks must be a contiguous CPU uint8 tensor of {want} bytes ({rows} rows of {k} "
                         f"in blocks of {elems}: {nbytes} bytes each), got {blocks.dtype} with {blocks.numel()} bytes")


def _block_mm(x: torch.Tensor, blocks: torch.Tensor, kind: int, out_features: int, gemm: bool = False,
              act: int = -1) -> torch.Tensor:
    """x (m, k) float32 · Ŵ (out_features, k)ᵀ → (m, out_features) float32; with act ≥ 0, (m, out_features / 2)."""
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"block_mm: x must be a contiguous 2-D float32 CPU tensor, got {x.dtype} {tuple(x.shape)}")
    if act not in (-1, 0, 1) or (act >= 0 and out_features % 2):
        raise ValueError(f"block_mm: act {act} (-1 none, 0 SiLU, 1 GELU-tanh) with {out_features} outputs")
    m, k = x.shape
    _check_blocks(blocks, kind, out_features, k, "block_mm")
    n = out_features if act < 0 else out_features // 2
    y = torch.empty(m, n)
    if not m:
        return y
    lib = library()
    fn = (lib.ak_gemm if gemm else lib.ak_gemv) if act < 0 else (lib.ak_gemm_gated if gemm else lib.ak_gemv_gated)
    if fn(kind, blocks.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, act_scratch(m * (k // 32) * ACT_BLOCK_BYTES),
          *(() if act < 0 else (act,)), torch.get_num_threads()):
        raise RuntimeError(f"{fn.__name__} refused blocks of type {kind:#x}, {out_features}×{k}")
    return y


def _block_mm_fake(x, blocks, kind, out_features, gemm=False, act=-1):
    return x.new_empty(x.shape[0], out_features if act < 0 else out_features // 2)


def _block_dequantize(blocks: torch.Tensor, kind: int, out: torch.Tensor) -> None:
    """out (n, k) float32 or bfloat16 ← the weight the n rows of ``blocks`` hold (interleaved blocks: n a multiple
    of the group's rows)."""
    if out.dim() != 2 or out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
        raise ValueError(f"block_dequantize: out must be a contiguous 2-D float32 or bfloat16 tensor, got {out.dtype} "
                         f"{tuple(out.shape)}")
    n, k = out.shape
    _check_blocks(blocks, kind, n, k, "block_dequantize")
    if n and library().ak_dequantize(kind, blocks.data_ptr(), out.data_ptr(), int(out.dtype == torch.bfloat16), n, k,
                                     torch.get_num_threads()):
        raise RuntimeError(f"ak_dequantize refused blocks of type {kind:#x}, {n}×{k}")


def _block_dequantize_fake(blocks, kind, out):
    return None


def _block_rows(blocks: torch.Tensor, kind: int, out_features: int, in_features: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (int64, 1-D) of the (out_features, in_features) weight as float32 (len(idx), in_features): an
    embedding lookup in a quantized table; only the rows asked for are decoded. IndexError for an id out of range."""
    if idx.dim() != 1 or idx.dtype != torch.int64 or not idx.is_contiguous():
        raise ValueError(f"block_rows: idx must be a contiguous 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    _check_blocks(blocks, kind, out_features, in_features, "block_rows")
    check_ids(idx, out_features)
    rows = torch.empty(len(idx), in_features)
    if len(idx) and library().ak_dequantize_rows(kind, blocks.data_ptr(), idx.data_ptr(), len(idx), rows.data_ptr(),
                                                 out_features, in_features):
        raise RuntimeError(f"ak_dequantize_rows refused blocks of type {kind:#x}, {out_features}×{in_features}")
    return rows


def check_ids(idx: torch.Tensor, n: int) -> None:
    """IndexError unless every id in ``idx`` is in [0, n): the rows of an n-row table."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"token id out of range for a vocabulary of {n}")


def _block_rows_fake(blocks, kind, out_features, in_features, idx):
    return idx.new_empty(idx.shape[0], in_features, dtype=torch.float32)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (Zhang & Sennrich 2019) over the last dimension of x (contiguous float32, CPU) with weight (d,)
    float32: (y, r), y = x·r·w in ``out_dtype`` (float32 or bfloat16), r (..., 1) = 1/√(mean(x²) + ε) in float32
    (kernels/train_ops.c: one pass over each row; needs the 512-bit training kernels, :func:`train_kernels`)."""
    d = x.shape[-1] if x.dim() else 0
    if (x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu" or not d
            or weight.shape != (d,) or weight.dtype != torch.float32 or not weight.is_contiguous()):
        raise ValueError(f"rms_norm: x must be contiguous float32 on the CPU and weight ({d},) float32, got "
                         f"{x.dtype} {tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"rms_norm: out_dtype float32 or bfloat16, not {out_dtype}")
    lib = train_kernels()
    if lib is None:
        raise RuntimeError("rms_norm: this build has no 512-bit training kernels (attnkit.kernels.train_kernels)")
    r = torch.empty(*x.shape[:-1], 1)
    y = torch.empty(x.shape, dtype=out_dtype)
    if x.numel() and lib.ak_rmsnorm_forward(x.data_ptr(), weight.data_ptr(), x.numel() // d, d, eps, r.data_ptr(), 1,
                                            y.data_ptr(), int(out_dtype == torch.bfloat16), torch.get_num_threads()):
        raise RuntimeError("ak_rmsnorm_forward failed")
    return y, r


def _rms_norm_fake(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


for _name, _schema, _impl, _fake in (
        ("block_mm", "block_mm(Tensor x, Tensor blocks, int kind, int out_features, bool gemm=False, int act=-1) -> Tensor",
         _block_mm, _block_mm_fake),
        ("block_dequantize", "block_dequantize(Tensor blocks, int kind, Tensor(a!) out) -> ()",
         _block_dequantize, _block_dequantize_fake),
        ("block_rows", "block_rows(Tensor blocks, int kind, int out_features, int in_features, Tensor idx) -> Tensor",
         _block_rows, _block_rows_fake),
        ("rms_norm", "rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor)",
         _rms_norm, _rms_norm_fake)):
    _LIB.define(_schema)
    _LIB.impl(_name, _impl, "CPU")
    torch.library.register_fake(f"attnkit::{_name}", _fake, lib=_LIB)

block_mm = torch.ops.attnkit.block_mm
block_dequantize = torch.ops.attnkit.block_dequantize
block_rows = torch.ops.attnkit.block_rows
rms_norm = torch.ops.attnkit.rms_norm
