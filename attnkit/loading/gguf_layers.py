"""The quantized layers of a GGUF file's tensors: its blocks kept under attnkit's kernels.

:func:`native_linear` makes a :class:`~attnkit.quant.native.GGUFBlockLinear` of a 2-D tensor's blocks, viewed in
place in the file's mapping (or repacked, the file's pages then dropped); the experts of a mixture of experts
(:mod:`attnkit.models.moe`) are 3-D tensors in GGUF, one expert's rows after another: :func:`moe_linear` makes
each expert's layer of its own rows. :func:`warn_dequantized` names the tensor types left without a kernel.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import replace

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from .errors import ModelLoadError
from .gguf_file import GGUFFile

Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def native_linear(g: GGUFFile, src: str, rows=None, bias: torch.Tensor | None = None,
                  interleaved: bool | None = None, cols=None) -> nn.Module | None:
    """The GGUF blocks themselves under attnkit's own kernels (:mod:`attnkit.quant.native`), when they build
    and have the tensor's type (None otherwise).

    The blocks are kept byte for byte, viewed in place in the file's mapping unless the layer repacks them;
    rows are un-permuted like the dense weights (a block never spans two rows). ``cols``: only those columns
    (a :class:`~attnkit.parallel.tensor.Split` along dim 1, on block boundaries: a tensor-parallel rank's).
    The file's pages of a tensor that was copied are dropped from resident memory at once, so loading never
    holds a model twice.
    """
    from ..quant.native import NATIVE_TYPES, GGUFBlockLinear, library

    t = g.tensors[src]
    if library() is None or t.ggml_type.name not in NATIVE_TYPES:
        return None
    blocks = torch.from_numpy(g.blocks(src))
    if rows is not None:
        blocks = rows(blocks)
    blocks, in_features = block_columns(g, src, blocks, t.shape[-1], cols)
    try:
        layer = GGUFBlockLinear(blocks, t.ggml_type.name, in_features, bias, interleaved=interleaved)
    except ValueError as e:
        raise ModelLoadError(g.path, str(e), tensor=src) from e
    if g.aliases(layer.blocks.data_ptr()):
        layer.on_release = functools.partial(g.release, src)  # once fusion has copied it (GGUFBlockLinear.cat_out)
        if interleaved is None:  # a layer of its own, not a part that fusion copies: streamed from huge pages
            layer.own_blocks()
    else:
        g.release(src)
    return layer


def block_columns(g: GGUFFile, src: str, blocks: torch.Tensor, in_features: int, cols) -> tuple[torch.Tensor, int]:
    """(the blocks of columns ``cols`` (a :class:`~attnkit.parallel.tensor.Split` along dim 1, None: all) of rows
    ``blocks`` (R, row bytes) of ``src``, their input count): a tensor-parallel rank's slice, on block boundaries."""
    from ..quant.native import BLOCK_TYPES

    if cols is None:
        return blocks, in_features
    kind = g.tensors[src].ggml_type.name
    per = BLOCK_TYPES[kind].block_elems
    if cols.start % per or cols.stop % per:
        raise ModelLoadError(g.path, f"columns {cols.start}…{cols.stop} of a tensor-parallel rank do not fall on "
                                     f"the {kind} blocks of {per}", tensor=src)
    part = blocks.view(blocks.shape[0], in_features // per, -1)[:, cols.start // per:cols.stop // per]
    return part.reshape(blocks.shape[0], -1), cols.stop - cols.start


def warn_dequantized(g: GGUFFile, names) -> None:
    """Say which quantized tensor types have no kernel here and are decoded to float at load."""
    from ..quant.native import NATIVE_TYPES

    counts: dict[str, int] = {}
    for name in names:
        kind = g.tensors[name].ggml_type.name
        if kind not in NATIVE_TYPES and kind not in ("F32", "F16", "BF16") and len(g.tensors[name].shape) > 1:
            counts[kind] = counts.get(kind, 0) + 1
    if counts:
        what = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(counts.items()))
        warnings.warn(f"{g.path.name}: tensor types without an attnkit kernel, dequantized to float32 at load "
                      f"(more memory, slower): {what}; the kernels take {', '.join(sorted(NATIVE_TYPES))}",
                      RuntimeWarning, stacklevel=3)



# -- mixtures of experts (attnkit.models.moe): a layer's experts are 3-D tensors in GGUF ------------------------
#: our MoE projections: the router and expert e's gate/up/down, which read rows e·R … (e+1)·R of the stacked
#: ``blk.N.ffn_{gate,up,down}_exps.weight`` (PyTorch shape (E, R, C), viewed as (E·R, C))
MOE_LINEAR = re.compile(r"layers\.\d+\.ffn\.(router|experts\.(\d+)\.(gate|up|down)_proj)")
_EXPERT_PARAM = re.compile(r"layers\.\d+\.ffn\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def expert_of(ours: str) -> int | None:
    """The expert whose weight parameter ``ours`` is (``layers.N.ffn.experts.E.gate_proj.weight`` → E), or None."""
    m = _EXPERT_PARAM.fullmatch(ours)
    return int(m.group(1)) if m else None


def _expert_rows(g: GGUFFile, src: str, e: int) -> tuple[int, int, int]:
    """(first row, rows, columns) of expert ``e`` in the stacked tensor ``src`` viewed as (E·R, C)."""
    shape = g.tensors[src].shape
    if len(shape) != 3 or not 0 <= e < shape[0]:
        raise ModelLoadError(g.path, f"expected experts stacked in a 3-D tensor (experts, rows, columns) holding "
                                     f"expert {e}, got shape {shape}", tensor=src)
    return e * shape[1], shape[1], shape[2]


def expert_loader(g: GGUFFile, src: str, e: int):
    """A loader of expert ``e``'s (R, C) float32 weight: only its rows are read and dequantised."""
    from gguf.quants import dequantize

    def load() -> torch.Tensor:
        g.check_type(src)
        start, n, cols = _expert_rows(g, src, e)
        kind = g.tensors[src].ggml_type
        rows = g.blocks(src)[start:start + n]  # (R, row bytes), viewing the file
        out = np.empty((n, cols), dtype=np.float32)
        step = max(1, (1 << 18) // cols)  # ~256 k values per call, as GGUFFile.load
        for r in range(0, n, step):
            out[r:r + step] = dequantize(np.ascontiguousarray(rows[r:r + step]), kind).reshape(-1, cols)
        return torch.from_numpy(out)

    return load


def moe_linear(g: GGUFFile, name: str, src: str, scheme: str, group_size: int,
               compute_dtype: torch.dtype, split=None) -> nn.Module | None:
    """The quantized layer of a router or of one expert's projection (None: it stays float).

    "gguf": the file's blocks under attnkit's kernels — an expert's rows of the stacked tensor, viewed in place
    (gate/up, in GGUF's layout for fusion to repack once, as the dense ffn_gate/ffn_up) or interleaved (down);
    types without a kernel as "auto". "auto": Q8_0 experts → int8, Q4_0/Q4_1 → int4 exactly (the blocks' codes and
    scales, as :func:`quantized_linear`), others float. "int8" / "int4": the dequantised rows quantized. The router (E rows)
    keeps the file's blocks with "gguf" and is never re-quantized: the top-k choice is made on its exact logits.
    ``split``: only those rows or columns of the expert's weight (a tensor-parallel rank's,
    :class:`~attnkit.parallel.tensor.Split`).
    """
    from ..quant import Int8Linear, quantize_weight

    m = MOE_LINEAR.fullmatch(name)
    kind = g.tensors[src].ggml_type
    if m.group(1) == "router":
        return native_linear(g, src) if scheme == "gguf" else None  # F32 / F16 (the converter's): stays float
    e = int(m.group(2))
    if scheme == "gguf":
        native = _native_expert(g, src, e, interleaved=False if m.group(3) in ("gate", "up") else None, split=split)
        if native is not None:
            return native
        scheme = "auto"
    if kind in Q4_TYPES and scheme in ("auto", "int4"):  # exact, as quantized_linear: the blocks' own codes and scales
        return _expert_int4(g, src, e, compute_dtype, split)
    if scheme == "auto":
        if kind != GGMLQuantizationType.Q8_0:
            return None
        scheme = "int8"
    w = expert_loader(g, src, e)()
    w = w if split is None else split.of(w)
    if scheme == "int8":
        return Int8Linear.from_float(w, None, compute_dtype)
    return quantize_weight(w, "int4", None, group_size, compute_dtype)


def _expert_int4(g: GGUFFile, src: str, e: int, compute_dtype: torch.dtype, split=None) -> nn.Module:
    """Expert ``e``'s Q4_0 / Q4_1 rows as an Int4Linear, bit for bit (see :meth:`GGUFFile.load_q4`: a block is
    f16 d [, f16 m], then 16 bytes holding element j in the low nibble of byte j, element j + 16 in the high one)."""
    from ..quant import Int4Linear

    t = g.tensors[src]
    start, n, cols = _expert_rows(g, src, e)
    size = 20 if t.ggml_type == GGMLQuantizationType.Q4_1 else 18
    raw = g.blocks(src)[start:start + n].reshape(n, cols // 32, size)
    d = torch.from_numpy(raw[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32))  # (R, C/32)
    m = torch.from_numpy(raw[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)) if size == 20 else None
    qs = raw[..., size - 16:]
    codes = torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, cols))
    zeros = 8 * d + m if m is not None else torch.zeros_like(d)  # w = d·q + m = d·(q − 8) + (m + 8d)
    if split is not None:  # a tensor-parallel rank's rows, or its columns (whole groups of 32)
        per = replace(split, start=split.start // 32, stop=split.stop // 32, size=split.size // 32) if split.dim else split
        codes, d, zeros = split.of(codes), per.of(d), per.of(zeros)
    return Int4Linear.from_codes(codes, d, zeros, 32, None, compute_dtype)


def _native_expert(g: GGUFFile, src: str, e: int, interleaved: bool | None, split=None) -> nn.Module | None:
    """Expert ``e``'s rows of the stacked blocks under attnkit's kernels (None: no kernel for the type). Viewed in
    place in the file's mapping unless interleaved; the file's pages of rows that were copied are dropped."""
    from ..quant.native import NATIVE_TYPES, GGUFBlockLinear, library

    t = g.tensors[src]
    if library() is None or t.ggml_type.name not in NATIVE_TYPES:
        return None
    start, n, cols = _expert_rows(g, src, e)
    blocks = torch.from_numpy(g.blocks(src))[start:start + n]  # (R, row bytes): contiguous rows, no copy
    if split is not None and split.dim == 0:
        blocks = split.of(blocks)
    blocks, cols = block_columns(g, src, blocks, cols, split if split is not None and split.dim == 1 else None)
    try:
        layer = GGUFBlockLinear(blocks, t.ggml_type.name, cols, None, interleaved=interleaved)
    except ValueError as err:
        raise ModelLoadError(g.path, f"expert {e}: {err}", tensor=src) from err
    # an expert sees a few of a prompt chunk's rows (k / E of them): the integer kernel beats decoding the whole
    # expert for the dense product there, and takes every row alike (batch invariance), as for the head; where the
    # integer matrix product applies (kernels/gemm.c) its prompt rows take that (a 512-token prompt of the
    # Qwen3-MoE shape of benchmarks/sizes.py: 64 rows an expert on average)
    layer.dense_for_prompts = False
    layer.int8_prompts = layer.gemm_shape()
    release = functools.partial(_release_rows, g, src, start, n)
    if g.aliases(layer.blocks.data_ptr()):
        layer.on_release = release  # once fusion has copied it (GGUFBlockLinear.cat_out)
    else:
        release()
    return layer


def _release_rows(g: GGUFFile, src: str, start: int, n: int) -> None:
    """:meth:`GGUFFile.release` for rows ``start`` … ``start + n`` of ``src`` (one expert's): only the pages
    wholly inside them, so the neighbouring experts' rows stay resident."""
    import mmap

    t = g.tensors[src]
    row = t.nbytes // (t.shape[0] * t.shape[1])
    page = mmap.PAGESIZE
    lo = -(-(t.offset + start * row) // page) * page
    hi = (t.offset + (start + n) * row) // page * page
    if hi > lo and hasattr(g._mm, "madvise"):
        g._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
