"""The C kernels over a quantized KV cache (attnkit/kernels/kernels.c): ``ak_quantize_kv_rows`` writes the rows
gguf-py's quantizer writes (GGUF Q8_0 / Q4_0 blocks, byte for byte), and ``ak_paged_attention_kv`` reads them
through shuffled block tables as a float64 softmax attention over gguf-py's dequantized rows does."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from attnkit.kernels import library

lib = library()
pytestmark = pytest.mark.skipif(lib is None, reason="the C kernels are not built")

KV_TYPES = {2: GGMLQuantizationType.Q8_0, 3: GGMLQuantizationType.Q4_0}  # kv_type -> gguf's type
BLOCK_BYTES = {2: 34, 3: 18}


def ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def rows(n: int, hd: int, seed: int) -> np.ndarray:
    """n rows of hd float32 of varied scales, with the cases that test the rounding: an all-zero block (scale 0),
    ties in the largest magnitude (of either sign), values that land on halves, and a product x/d that must be
    rounded on its own (not fused with the + 8.5 that follows it)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, hd)) * rng.uniform(0, 4, (n, 1))).astype(np.float32)
    x[0] = 0
    x[0, 32:] = -0.0  # q4_0: d = -0/-8 = +0 (gguf-py's sign of d: the first element's)
    x[1, :32] = 1.0  # all 32 tie for the largest |x|
    x[2, :32] = np.arange(32) / 2 - 8  # q4_0: m = -8, d = 1: each x + 8.5 an integer, 7.5 + 8.5 = 16 clipped to 15
    x[3, 32:] = np.where(np.arange(hd - 32) % 2, 3.0, -3.0)  # q4_0: -3 comes first, so d = 3/8 > 0
    x[4, :32] = np.arange(32) - 15.5  # q4_0: ties of |x| of either sign, -15.5 the first
    x[5] = np.round(x[5] * 8) / 8  # binary fractions: many exact halves after scaling
    x[6, :32] = 2.8125  # q4_0: x/d = -7.5000002 is rounded to -7.5 before the + 8.5 (an FMA would give n = 0, not 1)
    x[6, 0] = 3.0
    x[7, :32] = np.r_[127.0, np.arange(31) - 15.5]  # q8_0: d = 1, and the halves round away from zero
    return x


def quantize(kv_type: int, x: np.ndarray) -> np.ndarray:
    n, hd = x.shape
    out = np.zeros((n, hd // 32 * BLOCK_BYTES[kv_type]), dtype=np.uint8)
    assert lib.ak_quantize_kv_rows(kv_type, ptr(x), ptr(out), n, hd) == 0
    return out


@pytest.mark.parametrize("kv_type", [2, 3])
@pytest.mark.parametrize("hd", [64, 128])
def test_quantized_rows_are_ggufs_blocks(kv_type, hd):
    x = rows(200, hd, seed=hd + kv_type)
    got = quantize(kv_type, x)
    np.testing.assert_array_equal(got, quants.quantize(x, KV_TYPES[kv_type]))


def attention(q, k_pool, v_pool, kv_type, tables, lens, starts, threads=2, tail=None, softcap=0.0):
    """ak_paged_attention_kv's output (B, nh, hd) and return code; ``tail``: (k, v (nkv, slots, bs, Q8_0 row bytes),
    slot (B,), first exact key (B,)) — the exact blocks (attnkit.engine.kv_tail); ``softcap`` > 0: Gemma 2's."""
    B, nh, hd = q.shape
    nkv, num_blocks, bs, _ = k_pool.shape
    max_nb = tables.shape[1]
    out = np.full((B, nh, hd), np.nan, dtype=np.float32)
    scratch = np.zeros(threads * (nh // nkv) * max_nb * bs, dtype=np.float32)
    rc = lib.ak_paged_attention_kv(ptr(q), ptr(k_pool), ptr(v_pool), kv_type, ptr(tables), ptr(lens), ptr(starts),
                                   ptr(out), B, nh, nkv, hd, bs, num_blocks, max_nb, ctypes.c_float(hd ** -0.5),
                                   ptr(scratch), threads, tail_struct(tail), ctypes.c_float(softcap))
    return out, rc


def tail_struct(tail):
    if tail is None:
        return None
    from attnkit.engine.paged_attention import _Tail

    tk, tv, slot, first = tail
    return ctypes.byref(_Tail(ptr(tk), ptr(tv), tk.shape[1], ptr(slot), ptr(first)))


def reference(q, k, v, tables, lens, starts):
    """Softmax attention in float64 over dense K/V (nkv, num_blocks, bs, hd) read through the block tables."""
    B, nh, hd = q.shape
    nkv, _, bs, _ = k.shape
    g = nh // nkv
    out = np.zeros((B, nh, hd))
    for b in range(B):
        t = np.arange(starts[b], lens[b])
        blk, off = tables[b, t // bs], t % bs
        for h in range(nh):
            kk, vv = k[h // g, blk, off].astype(np.float64), v[h // g, blk, off].astype(np.float64)
            s = kk @ q[b, h].astype(np.float64) * hd ** -0.5
            p = np.exp(s - s.max())
            out[b, h] = p @ vv / p.sum()
    return out


@pytest.mark.parametrize("kv_type", [2, 3])
@pytest.mark.parametrize("hd", [64, 128, 96])
@pytest.mark.parametrize("nh,nkv", [(8, 2), (4, 4)])
def test_paged_attention_over_quantized_pools(kv_type, hd, nh, nkv):
    rng = np.random.default_rng(1000 * hd + 10 * nh + kv_type)
    num_blocks, bs, max_nb = 24, 8, 5
    lens = np.array([37, 1, 40, 19, 9], dtype=np.int64)
    starts = np.array([0, 0, 13, 18, 3], dtype=np.int64)  # keys before start_b are not attended to
    B = len(lens)
    tables = np.stack([rng.permutation(num_blocks)[:max_nb] for _ in range(B)]).astype(np.int64)
    dense = rng.standard_normal((2, nkv * num_blocks * bs, hd)).astype(np.float32) * 2
    k_pool, v_pool = (quants.quantize(x, KV_TYPES[kv_type]).reshape(nkv, num_blocks, bs, -1) for x in dense)
    k, v = (quants.dequantize(p, KV_TYPES[kv_type]) for p in (k_pool, v_pool))  # (nkv, num_blocks, bs, hd)
    q = rng.standard_normal((B, nh, hd)).astype(np.float32)
    out, rc = attention(q, k_pool, v_pool, kv_type, tables, lens, starts)
    assert rc == 0
    ref = reference(q, k, v, tables, lens, starts)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the float32 pool of the same values, through the same call: the same attention
    f32, rc = attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), 0, tables, lens, starts)
    assert rc == 0
    np.testing.assert_allclose(f32, out, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("kv_type", [2, 3])
@pytest.mark.parametrize("hd", [64, 128, 96])
def test_exact_blocks_are_read_from_the_tail(kv_type, hd):
    """Query b reads its keys first[b] <= t < lens[b] (all in its own block) as Q8_0 rows of tail slot slot[b] and
    the earlier ones from the pool; slot -1 reads them all from the pool."""
    rng = np.random.default_rng(hd + kv_type)
    nh, nkv, num_blocks, bs, max_nb, slots = 4, 2, 12, 8, 4, 3
    lens = np.array([30, 5, 17, 24], dtype=np.int64)
    starts = np.array([0, 0, 10, 0], dtype=np.int64)
    slot = np.array([2, 0, 1, -1], dtype=np.int64)
    first = np.array([24, 2, 16, 16], dtype=np.int64)  # the second query's first 2 rows are read from the pool
    B = len(lens)
    tables = np.stack([rng.permutation(num_blocks)[:max_nb] for _ in range(B)]).astype(np.int64)
    dense = rng.standard_normal((2, nkv * num_blocks * bs, hd)).astype(np.float32)
    k_pool, v_pool = (quants.quantize(x, KV_TYPES[kv_type]).reshape(nkv, num_blocks, bs, -1) for x in dense)
    k, v = (quants.dequantize(p, KV_TYPES[kv_type]) for p in (k_pool, v_pool))
    tk, tv = (quants.quantize(rng.standard_normal((nkv * slots * bs, hd)).astype(np.float32), KV_TYPES[2])
              .reshape(nkv, slots, bs, -1) for _ in range(2))
    tkf, tvf = (quants.dequantize(t, KV_TYPES[2]) for t in (tk, tv))
    q = rng.standard_normal((B, nh, hd)).astype(np.float32)
    out, rc = attention(q, k_pool, v_pool, kv_type, tables, lens, starts, tail=(tk, tv, slot, first))
    assert rc == 0
    # the reference: the pool's dequantized rows with the exact rows put in their place
    ref = np.zeros((B, nh, hd))
    for b in range(B):
        kb, vb = k.copy(), v.copy()
        if slot[b] >= 0:
            for t in range(first[b], lens[b]):
                kb[:, tables[b, t // bs], t % bs] = tkf[:, slot[b], t % bs]
                vb[:, tables[b, t // bs], t % bs] = tvf[:, slot[b], t % bs]
        ref[b] = reference(q[b:b + 1], kb, vb, tables[b:b + 1], lens[b:b + 1], starts[b:b + 1])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    plain, _ = attention(q, k_pool, v_pool, kv_type, tables, lens, starts)
    np.testing.assert_allclose(out[3], plain[3], rtol=1e-6, atol=1e-7)  # slot -1: the pool alone
    assert np.abs(out[:3] - plain[:3]).max() > 1e-2  # the others did read the tail


@pytest.mark.parametrize("kv_type", [0, 1, 2, 3])
@pytest.mark.parametrize("hd,nh,nkv", [(64, 8, 2), (128, 6, 2), (64, 3, 3), (96, 4, 2)])
def test_a_prompts_rows_attended_together_are_each_the_row_alone(kv_type, hd, nh, nkv):
    """Rows of one sequence at consecutive positions (a prompt's chunk, a verification) are attended in tiles that
    share each K/V row and reduce 16 scores at once; every row's output is bit for bit the one it gets alone (batch
    invariance), and matches the float64 reference. Runs: 37 rows (tiles of 16, 16, 5), a window's start > 0, runs
    broken by another sequence's row, by a different block table and by a position skipped."""
    rng = np.random.default_rng(10 * hd + kv_type + nh)
    num_blocks, bs, max_nb = 40, 8, 10
    tabs = [rng.permutation(num_blocks)[:max_nb] for _ in range(3)]
    rows_ = ([(0, 0, n) for n in range(30, 67)] + [(1, 0, 5)] + [(2, 9, n) for n in range(12, 20)]
             + [(1, 0, 6), (1, 0, 7), (1, 0, 9), (0, 0, 1), (0, 0, 2), (2, 0, 2)])
    tables = np.stack([tabs[t] for t, _, _ in rows_]).astype(np.int64)
    tables[-3, 3] = (tables[-3, 3] + 1) % num_blocks  # a different block past where its keys end: still one run
    starts = np.array([s for _, s, _ in rows_], dtype=np.int64)
    lens = np.array([n for _, _, n in rows_], dtype=np.int64)
    dense = rng.standard_normal((2, nkv * num_blocks * bs, hd)).astype(np.float32) * 2
    if kv_type >= 2:
        k_pool, v_pool = (quants.quantize(x, KV_TYPES[kv_type]).reshape(nkv, num_blocks, bs, -1) for x in dense)
        k, v = (quants.dequantize(p, KV_TYPES[kv_type]) for p in (k_pool, v_pool))
    else:
        k_pool, v_pool = (x.astype(np.float32 if kv_type == 0 else np.float16).reshape(nkv, num_blocks, bs, hd) for x in dense)
        k, v = (p.astype(np.float32) for p in (k_pool, v_pool))
    q = rng.standard_normal((len(rows_), nh, hd)).astype(np.float32)
    for softcap in (0.0, 3.0):  # Gemma 2's soft-capped scores too
        out, rc = attention(q, k_pool, v_pool, kv_type, tables, lens, starts, softcap=softcap)
        assert rc == 0
        for b in range(len(rows_)):
            alone, rc = attention(q[b:b + 1], k_pool, v_pool, kv_type, tables[b:b + 1], lens[b:b + 1], starts[b:b + 1],
                                  softcap=softcap)
            assert rc == 0 and np.array_equal(alone[0], out[b]), b
    out, _ = attention(q, k_pool, v_pool, kv_type, tables, lens, starts)
    ref = reference(q, k, v, tables, lens, starts)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_error_codes():
    x = np.ones((2, 48), dtype=np.float32)
    out = np.zeros(2 * 48 * 2, dtype=np.uint8)
    assert lib.ak_quantize_kv_rows(2, ptr(x), ptr(out), 2, 48) == 3  # hd not a multiple of 32
    assert lib.ak_quantize_kv_rows(3, ptr(x), ptr(out), 2, 48) == 3
    for bad in (0, 1, 4, -1):  # float types are not quantized; 4, -1 are no type
        assert lib.ak_quantize_kv_rows(bad, ptr(x), ptr(out), 2, 48) == 4

    tables, lens, starts = np.zeros((1, 1), dtype=np.int64), np.array([1], dtype=np.int64), np.zeros(1, dtype=np.int64)
    q = np.ones((1, 2, 48), dtype=np.float32)
    pool = np.zeros((1, 1, 4, 48 * 4), dtype=np.uint8)
    for kv_type in (2, 3):
        assert attention(q, pool, pool, kv_type, tables, lens, starts)[1] == 3
    for kv_type in (4, -1):
        assert attention(q, pool, pool, kv_type, tables, lens, starts)[1] == 4
    pool = np.zeros((2, 1, 4, 68), dtype=np.uint8)
    assert attention(np.ones((1, 3, 64), dtype=np.float32), pool, pool, 2, tables, lens, starts)[1] == 1  # nh % nkv
