"""The products attnkit's integer kernels compute, in numpy float64: the activations quantized exactly as
llama.cpp's x86 ``quantize_row_q8_0`` / ``quantize_row_q8_1`` (blocks of 32: q = rint(x · 127 / max|x|) in float32,
d = fp16(max|x| / 127); q8_1 also s = fp16(max|x| / 127 · Σq)) and ``quantize_row_q8_K`` (blocks of 256: d = 1 /
(127 / max|x|) in float32), times the GGUF weights as gguf-py decodes them. For the types whose activations are
q8_1 (Q4_1, Q5_1: w = d·q + m) the minimum multiplies that s, as in ``ggml_vec_dot_q4_1_q8_1``."""

from __future__ import annotations

import numpy as np
import torch

from attnkit.quant.native import BLOCK_TYPES, dequantize_reference

MIN_OFFSET = {"Q4_1": 2, "Q5_1": 2}  # byte offset of a block's fp16 minimum m


def q8_activations(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q (m, k) int, d (m, k/32), s (m, k/32)) float64 as llama.cpp's q8_0/q8_1 (group 32) or q8_K (group 256),
    each block of 32's d (a q8_K super-block's d repeated)."""
    m, k = x.shape
    g = x.astype(np.float32).reshape(m, k // group, group)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint((g * inv).astype(np.float32)).reshape(m, k // 32, 32)
    if group == 32:
        d = (amax / np.float32(127)).astype(np.float32).reshape(m, k // 32)
        s = (d * q.sum(-1).astype(np.float32)).astype(np.float32).astype(np.float16)
        d = d.astype(np.float16)
    else:
        with np.errstate(divide="ignore"):
            d = np.where(inv > 0, np.float32(1) / np.where(inv > 0, inv, 1), 0).astype(np.float32)
        d = np.repeat(d.reshape(m, k // group), group // 32, axis=1)
        s = (d * q.sum(-1).astype(np.float32)).astype(np.float32)
    return q.reshape(m, k), d.astype(np.float64), s.astype(np.float64)


def rounded(x: np.ndarray, kind: str) -> np.ndarray:
    """x as the kernels see it, d·q (m, k) float64."""
    q, d, _ = q8_activations(x, BLOCK_TYPES[kind].block_elems)
    m, k = x.shape
    return (q.reshape(m, k // 32, 32) * d[..., None]).reshape(m, k)


def product(x: np.ndarray, blocks: np.ndarray, kind: str, k: int) -> np.ndarray:
    """x (m, k) times the (n, k) weights in ``blocks`` (GGUF's row layout) → (m, n) float64, as the kernels
    compute it up to float summation order."""
    blocks = np.ascontiguousarray(blocks)
    w = dequantize_reference(torch.from_numpy(blocks), kind, k).double().numpy()
    y = rounded(x, kind) @ w.T
    if kind in MIN_OFFSET:  # Σ_b m_b·s_b where x̂ gives Σ_b m_b·d_b·Σq_b
        t = BLOCK_TYPES[kind]
        q, d, s = q8_activations(x, 32)
        raw = blocks.view(np.uint8).reshape(len(w), k // 32, t.block_bytes)
        mins = raw[..., MIN_OFFSET[kind]:MIN_OFFSET[kind] + 2].copy().view(np.float16)[..., 0].astype(np.float64)
        m = x.shape[0]
        y += (s - d * q.reshape(m, k // 32, 32).sum(-1)) @ mins.T
    return y
