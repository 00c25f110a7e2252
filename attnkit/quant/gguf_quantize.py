"""attnkit's own GGUF quantizer: float weights → GGUF blocks, llama-quantize's presets, and ``attnkit quantize``.

- :func:`quantize_rows`: a float32 matrix → the rows' GGUF blocks (uint8, ``(rows, row_bytes)``). Q4_0, Q4_1,
  Q5_0, Q5_1 and Q8_0 are ``gguf.quants.quantize`` (the reference code of the llama.cpp project, bit for bit
  ggml's ``quantize_row_*_ref``); Q4_K, Q5_K and Q6_K are ours, vectorized numpy after ggml's reference
  quantizers ``quantize_row_q4_K_ref`` / ``q5_K`` (``make_qkx2_quants``: per sub-block of 32 a scale and a min
  found by a small search over 21 / 16 candidate scales, weighted least squares) and ``quantize_row_q6_K_ref``
  (``make_qx_quants``: 18 candidate scales per sub-block of 16, weights x²). gguf-py decodes all of them.
  That is what ``llama-quantize`` does without an importance matrix. The K quantizers follow the reference
  step by step in float32, but numpy sums in another order than C (and C may fuse multiply-adds), so a
  rare near-tie may pick another candidate: the blocks are not promised bit-equal to llama.cpp's.
- :func:`tensor_type`: which type a tensor gets in a preset (``Q4_K_M`` …), llama.cpp's
  ``llama_tensor_get_type`` for llama-architecture models: the output head (and a tied token embedding) Q6_K
  in the K and legacy presets (Q8_0 stays Q8_0), attn_v / ffn_down bumped in the layers ``use_more_bits``
  picks (``_M``) or the first ones (``_S``), 1-D tensors kept, and the fallback of 256-block types to a
  32-block one when a row's length is not a multiple of 256 (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).
- :func:`requantize`: a GGUF file → the same model in a preset, every metadata key copied with its own value
  type, tensors written one at a time (memory: one tensor's float32 copy and its blocks).

    attnkit quantize IN.gguf OUT.gguf Q4_K_M
"""

from __future__ import annotations

import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

QK_K = 256

#: llama-quantize's presets: name → (llama_ftype id written as general.file_type, default tensor type)
PRESETS: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"),
}
#: the tensor types :func:`quantize_rows` writes
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
_FLOAT_TYPES = ("F32", "F16", "BF16")
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback
_CHUNK = 1 << 17  # values quantized per numpy pass: the temporaries stay in cache


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def row_bytes(type_name: str, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return cols // block * size


# -- the K quantizers ---------------------------------------------------------------------------------------

def _f16(a: np.ndarray) -> np.ndarray:
    """float32 → the float32 value of its float16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(a)))."""
    return a.astype(np.float16).astype(np.float32)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)[:, None]


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on every row of x (N, n): (scale (N,1), the_min (N,1), L (N, n) float32).

    As in ggml, a candidate that wins moves the min the next candidates' levels are taken from (the
    search is sequential in the candidates, vectorized over the sub-blocks). Each candidate's weighted
    squared error Σ w (s·l + m − x)² is expanded into the sums the fit already has (Σw, Σwx, Σwl, Σwl²,
    Σwlx) plus Σwx², evaluated in float64: passes over the values fewer than ggml's direct sum, with the
    same choices but for near-ties. L is computed once, for the winning candidate.
    """
    f32, f64 = np.float32, np.float64
    mn = np.minimum(x.min(-1, keepdims=True), f32(0))
    mx = x.max(-1, keepdims=True)
    sum_w = w.sum(-1, keepdims=True)
    wx = w * x
    sum_x = wx.sum(-1, keepdims=True)
    sum_x2 = _rowdot(wx, x).astype(f64)
    flat = mx == mn
    span = np.where(flat, f32(1), mx - mn)
    xm = x - mn

    def error(s, m, sl, sl2, sxl):  # Σ w (s l + m − x)², in float64
        s, m = s.astype(f64), m.astype(f64)
        return (s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sum_w - 2 * m * sum_x) + sum_x2

    def fit(iscale, xm):
        la = np.rint(iscale * xm)
        np.maximum(la, f32(0), out=la)  # x − min < 0 once min is a fitted one
        np.minimum(la, f32(nmax), out=la)
        wl = w * la
        return wl.sum(-1, keepdims=True), _rowdot(wl, la), _rowdot(wx, la)

    iscale0 = f32(nmax) / span
    scale = f32(1) / iscale0
    sl, sl2, sxl = fit(iscale0, xm)
    best = error(scale, mn, sl.astype(f64), sl2.astype(f64), sxl.astype(f64))
    best_is, best_from = iscale0, mn  # the winner's iscale and the min its levels were taken from
    for i in range(nstep + 1):
        # as in ggml, the candidates after a winner start from the winner's min
        span = np.where(flat, f32(1), mx - mn)
        iscale = (f32(rmin) + f32(rdelta) * f32(i) + f32(nmax)) / span
        sum_l, sum_l2, sum_xl = fit(iscale, x - mn)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        t_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        t_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = t_min > 0
        if pos.any():
            t_min = np.where(pos, f32(0), t_min)
            t_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), t_scale)
        cur = error(t_scale, t_min, sum_l.astype(f64), sum_l2.astype(f64), sum_xl.astype(f64))
        better = ok & (cur < best)
        best = np.where(better, cur, best)
        scale = np.where(better, t_scale, scale)
        best_is = np.where(better, iscale, best_is)
        best_from = np.where(better, mn, best_from)
        mn = np.where(better, t_min, mn)
    L = np.clip(np.rint(best_is * (x - best_from)), 0, nmax)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat, f32(0), L)
    return scale, -mn, L


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes of 8 six-bit scales and mins (ggml's q4_K/q5_K layout); ls, lm (nb, 8) uint8."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _qk_scales_mins(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """quantize_row_q4_K_ref / q5_K's common part on superblocks x (nb, 256): d, dmin (nb, 1) float16
    values, the packed scales (nb, 12) and the levels L (nb, 256) in 0..nmax."""
    f32 = np.float32
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av_x = np.sqrt((xs * xs).sum(-1, keepdims=True) / f32(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(-1, keepdims=True), f32(0))
    max_min = np.maximum(mins.max(-1, keepdims=True), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(np.rint(inv_scale * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min * mins), 0, 63).astype(np.uint8)
    d = _f16(max_scale / f32(63))
    dmin = _f16(max_min / f32(63))
    sd = (d * ls).reshape(nb * 8, 1)  # GGML_FP16_TO_FP32(d) * sc
    sm = (dmin * lm).reshape(nb * 8, 1)
    nz = sd != 0
    Lq = np.clip(np.rint((xs + sm) / np.where(nz, sd, f32(1))), 0, nmax)
    L = np.where(nz, Lq, L).astype(np.uint8).reshape(nb, QK_K)
    return d, dmin, _pack_scale_min_k4(ls, lm), L


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _qk_scales_mins(x, 15, -1.0, 0.1, 20)
    L = L.reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), sc, qs], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _qk_scales_mins(x, 31, -0.5, 0.1, 15)
    L = L.reshape(nb, 4, 2, 32)  # (chunk of 64, low/high 32, j)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    hi = (L >> 4).astype(np.uint8)  # bit 2n of qh[j]: element 64n + j; bit 2n + 1: element 64n + 32 + j
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1, 1) + np.arange(2, dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = np.bitwise_or.reduce((hi << shifts).reshape(nb, 8, 32), axis=1)
    return np.concatenate([d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), sc, qh, qs], axis=1)


def _make_qx(x: np.ndarray, nmax: int):
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on every row of x (N, n): (scale (N, 1), L + nmax)."""
    f32 = np.float32
    imax = np.abs(x).argmax(-1)[:, None]
    mx = np.take_along_axis(x, imax, -1)
    zero = np.abs(mx) < f32(1e-15)
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x

    def fit(iscale):
        la = np.rint(iscale * x)
        np.clip(la, -nmax, nmax - 1, out=la)
        return _rowdot(wx, la), _rowdot(w * la, la)

    best_is = f32(-nmax) / mx
    sumlx, suml2 = fit(best_is)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(i)) / mx
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
        best_is = np.where(better, iscale, best_is)
    L = np.clip(np.rint(best_is * x), -nmax, nmax - 1) + nmax
    return np.where(zero, f32(0), scale), np.where(zero, f32(0), L)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    scales, L = _make_qx(xs, 32)
    scales = scales.reshape(nb, 16)
    imax = np.abs(scales).argmax(-1)[:, None]
    max_scale = np.take_along_axis(scales, imax, -1)
    zero = np.abs(max_scale) < f32(1e-15)
    iscale = f32(-128) / np.where(zero, f32(1), max_scale)
    d = _f16(f32(1) / iscale)
    sc = np.minimum(np.rint(iscale * scales), 127).astype(np.int8)
    sd = (d * sc).reshape(nb * 16, 1)
    nz = sd != 0
    Lq = np.clip(np.rint(xs / np.where(nz, sd, f32(1))), -32, 31) + 32
    L = np.where(nz, Lq, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # (half of 128, quarter, l)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                          d.astype(np.float16).view(np.uint8)], axis=1)
    out[zero[:, 0]] = 0  # an all-zero superblock: memset 0 (d = 0 too)
    return out


_K_BLOCKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks, "Q6_K": _q6_k_blocks}


def _quantize_chunk(w: np.ndarray, type_name: str) -> np.ndarray:
    rows, cols = w.shape
    if type_name in _K_BLOCKS:
        return _K_BLOCKS[type_name](w.reshape(-1, QK_K)).reshape(rows, row_bytes(type_name, cols))
    from gguf.quants import quantize

    return quantize(w, GGMLQuantizationType[type_name])


def quantize_rows(w: np.ndarray, type_name: str, threads: int | None = None) -> np.ndarray:
    """The GGUF blocks of the rows of ``w`` (float, ``(rows, cols)``) in ``type_name``: uint8 ``(rows, row_bytes)``.

    F32 / F16 / BF16 return the values themselves (float32 / float16 / bf16 bits as uint16) as gguf stores
    them. Rows are processed in chunks of ~128 k values on ``threads`` threads (default: all cores; numpy
    releases the GIL in its loops).
    """
    if type_name not in QUANT_TYPES + _FLOAT_TYPES:
        raise ValueError(f"unknown tensor type {type_name!r} (supported: {', '.join(QUANT_TYPES + _FLOAT_TYPES)})")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_rows wants a 2-D array, got shape {w.shape}")
    if type_name in _FLOAT_TYPES:
        from gguf.quants import quantize

        return quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType[type_name])
    rows, cols = w.shape
    if cols % block_size(type_name):
        raise ValueError(f"row length {cols} is not a multiple of the {type_name} block size {block_size(type_name)}")
    out = np.empty((rows, row_bytes(type_name, cols)), dtype=np.uint8)
    step = max(1, _CHUNK // cols)
    spans = [(s, min(rows, s + step)) for s in range(0, rows, step)]

    def work(span: tuple[int, int]) -> None:
        s, e = span
        out[s:e] = _quantize_chunk(np.ascontiguousarray(w[s:e], dtype=np.float32), type_name)

    threads = threads or os.cpu_count() or 1
    if threads == 1 or len(spans) == 1:
        for span in spans:
            work(span)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, spans))
    return out


# -- llama.cpp's choice of types ------------------------------------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def check_preset(preset: str) -> str:
    p = preset.upper()
    if p not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (supported: {', '.join(PRESETS)})")
    return p


def tensor_type(preset: str, tensor_name: str, n_layers: int, shape: tuple[int, ...] | None = None,
                tied_embeddings: bool = True, source_type: str = "F32") -> str:
    """The type llama-quantize gives ``tensor_name`` in ``preset`` for a llama-architecture model.

    ``shape`` is the PyTorch shape (rows, cols); without it the tensor is taken as a matrix whose row
    length fits every block. Tensors with fewer than 2 dimensions, or whose name does not end in
    "weight", keep ``source_type`` (norms stay F32). ``tied_embeddings``: the file has no output.weight,
    so token_embd.weight is the head too and gets the head's type. ``n_layers``: the model's block count
    (attn_v and ffn_down bumps depend on the layer's place).
    """
    preset = check_preset(preset)
    default = PRESETS[preset][1]
    if (shape is not None and len(shape) < 2) or not tensor_name.endswith("weight"):
        return source_type
    if default in _FLOAT_TYPES:
        return default
    cols = shape[-1] if shape is not None else QK_K * 32
    new = default
    i = _layer(tensor_name)
    if tensor_name == "output.weight" or (tied_embeddings and tensor_name == "token_embd.weight"):
        if cols % block_size(default):
            new = "Q8_0"
        elif default != "Q8_0":
            new = "Q6_K"
    elif tensor_name == "token_embd.weight":
        pass
    elif any(k in tensor_name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        # llama.cpp's category_is_attn_v (its separate attn_qkv branch comes after this one: never reached)
        if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            new = "Q6_K"
        elif preset == "Q4_K_S" and i < 4:
            new = "Q5_K"
    elif "ffn_down" in tensor_name:
        if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            new = "Q6_K"
        elif preset == "Q4_K_S" and i < n_layers // 8:
            new = "Q5_K"
    if cols % block_size(new):  # tensor_type_fallback
        new = _FALLBACK.get(new, new)
        if cols % block_size(new):
            new = "F16"
    return new


# -- reading a header with its value types ----------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_metadata(path: str | Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """Every metadata key of a GGUF file: key → (value, value type, array element type or None).

    Strings come back as ``str`` when they are UTF-8 and as ``bytes`` otherwise, so writing them back with
    ``GGUFWriter.add_key_value`` reproduces the bytes. (:class:`attnkit.loading.gguf_file.GGUFFile` keeps
    the values but not their types.)
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24

        def string(pos: int) -> tuple[str | bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            raw = bytes(buf[pos + 8: pos + 8 + n])
            try:
                return raw.decode("utf-8"), pos + 8 + n
            except UnicodeDecodeError:
                return raw, pos + 8 + n

        def value(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if vtype == 8:
                return string(pos)
            raise ValueError(f"{path}: unexpected value type {vtype} at byte {pos}")

        out: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _NUMPY:
                    dt = np.dtype(_NUMPY[etype])
                    val = np.frombuffer(buf, dtype=dt, count=count, offset=pos).tolist()
                    pos += count * dt.itemsize
                else:
                    val = []
                    for _ in range(count):
                        v, pos = value(etype, pos)
                        val.append(v)
                out[str(key)] = (val, GGUFValueType.ARRAY, GGUFValueType(etype))
            else:
                v, pos = value(vtype, pos)
                out[str(key)] = (v, GGUFValueType(vtype), None)
        return out


# -- a GGUF file → the same model in a preset -------------------------------------------------------------------

def copy_metadata(w: Any, meta: dict, file_type: int | None) -> None:
    """A source file's key/values into writer ``w``, with this file's quantization version and ``file_type``
    (None: none written); the architecture (the writer's own), split keys and the old file type are not copied."""
    import gguf

    for key, (val, vtype, sub) in meta.items():
        if key in ("general.architecture", "general.file_type", "general.quantization_version") or key.startswith("split."):
            continue
        if key == "general.alignment":
            w.data_alignment = int(val)
        w.add_key_value(key, val, vtype, sub)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    if file_type is not None:
        w.add_uint32("general.file_type", int(file_type))


def requantize(src_path: str | Path, dst_path: str | Path, preset: str, threads: int | None = None,
               progress: bool = False) -> dict[str, str]:
    """Write ``src_path``'s model to ``dst_path`` in ``preset`` (see :data:`PRESETS`); returns name → type.

    Metadata is copied key by key with its value type; ``general.file_type`` and
    ``general.quantization_version`` are set as llama-quantize sets them. Each tensor is dequantized to
    float32 (:meth:`GGUFFile.load`), given :func:`tensor_type`'s type and written before the next is read.
    """
    import gguf

    from ..loading.gguf_file import GGUFFile

    preset = check_preset(preset)
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path}: no such file")
    if src_path.resolve() == dst_path.resolve():
        raise ValueError("the output file must differ from the input file")
    g = GGUFFile(src_path)
    meta = read_metadata(src_path)
    arch = meta.get("general.architecture", ("llama",))[0]
    n_layers = int(meta.get(f"{arch}.block_count", (0,))[0])
    tied = "output.weight" not in g.tensors
    types = {name: tensor_type(preset, name, n_layers, t.shape, tied, t.ggml_type.name) for name, t in g.tensors.items()}
    for name, ty in types.items():
        if ty not in QUANT_TYPES + _FLOAT_TYPES and ty != g.tensors[name].ggml_type.name:
            raise ValueError(f"{name}: cannot write type {ty}")

    w = gguf.GGUFWriter(dst_path, arch)
    copy_metadata(w, meta, PRESETS[preset][0])
    order = list(g.tensors)
    for name in order:
        t, ty = g.tensors[name], types[name]
        qt = GGMLQuantizationType[ty]
        nbytes = (int(np.prod(t.shape)) // GGML_QUANT_SIZES[qt][0]) * GGML_QUANT_SIZES[qt][1]
        w.add_tensor_info(name, list(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qt)  # shape as given
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=f"quantize {preset}", unit="tensor")
    for name in order:
        t, ty = g.tensors[name], types[name]
        if ty == t.ggml_type.name:  # kept as it is: the bytes themselves (no second rounding)
            data = g.raw_blocks(name)
        else:
            x = g.load(name)
            data = quantize_rows(x.reshape(-1, t.shape[-1]) if x.ndim != 2 else x, ty, threads)
            del x
        w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    w.close()
    return types
