"""Attention for training on the CPU by batched products, the weights recomputed in the backward pass: the path of
:mod:`.train_attention` where the C tiles do not take a call (no 512-bit vectors, a per-head mask or bias).

    S = Q·Kᵀ·scale + M        P = softmax(S) by rows        O = P·V
    dV = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = dS·K·scale    dK = dSᵀ·Q·scale

The backward of FlashAttention (Dao et al. 2022, Algorithm 4) with one tile the whole (T_q × T_k) score matrix of
a layer (or of a few heads or query rows, for long sequences: CHUNK_SCORES; under a mask that varies by query row,
pieces of QUERY_ROWS rows with only the keys they may attend): only Q, K, V and O are kept for the backward, about
what torch's fused kernel keeps, and S and P exist only while their chunk runs (P is recomputed by the same
operations, so it is the same P). On the CPU at training shapes that fused kernel is slow: for the default
model's 9 heads of 64 over 4 × 256 packed tokens in bf16 it took 4.0–4.4 ms forward and 9.0–10.0 ms backward a
layer, this 2.4 ms and 6.7 ms (docs/finetune.md, session 27). Scores and P are float32; the five products run in
the inputs' dtype (bf16 under autocast) with float32 accumulation; the scale multiplies Q, not the scores.
"""

from __future__ import annotations

import torch

from .scratch import reused


def _grouped(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, n_kv, T, d) → (B, n_kv·rep, T, d): KV head j serves query heads j·rep … j·rep + rep − 1 (GQA)."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _ungrouped(x: torch.Tensor, rep: int) -> torch.Tensor:
    """The gradient of :func:`_grouped`: each KV head's rep query heads summed."""
    if rep == 1:
        return x
    b, nh, t, d = x.shape
    return x.view(b, nh // rep, rep, t, d).sum(2)


def _scratch(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A (T_q × T_k)-sized buffer reused by every layer (:mod:`.scratch`): a fresh 9 MB tensor per product costs its
    page faults each time, more than the softmax itself at these sizes."""
    return reused(f"attention.{name}", shape, dtype)


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, empty_rows: bool) -> torch.Tensor:
    """P = softmax(Q·Kᵀ + M) by rows (Q already scaled), float32, in a reused buffer; a row with no key gets P = 0
    (``empty_rows``: the mask may leave a row none)."""
    shape = q.shape[:-1] + k.shape[-2:-1]  # (B, nh, T_q, T_k)
    p = _scratch("p", shape, torch.float32)
    if q.dtype == torch.float32:
        torch.matmul(q, k.transpose(-2, -1), out=p)
    else:  # (a mixed-dtype add would take torch's unvectorized path)
        p.copy_(torch.matmul(q, k.transpose(-2, -1), out=_scratch("low", shape, q.dtype)))
    if mask is not None:
        p.add_(mask)
    torch.ops.aten._softmax.out(p, -1, False, out=p)
    return p.nan_to_num_(0.0) if empty_rows else p


def _low(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the products' dtype (the reused buffer where that is not float32)."""
    return x if dtype == torch.float32 else _scratch("low", x.shape, dtype).copy_(x)


CHUNK_SCORES = 1 << 22  # scores a chunk (16 MiB of float32): longer sequences go by heads, then by query rows
QUERY_ROWS = 64  # query rows a piece of a masked call: each takes only the keys its rows may attend

Chunk = tuple[slice, slice, slice, slice, slice]  # batch rows, query heads, KV heads, query positions, key positions


def _chunks(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> list[Chunk]:
    """The call's chunks: the whole of it where its scores fit CHUNK_SCORES; else one batch row and as many whole
    GQA groups as fit; else one group and as many query rows as fit (at least one). Under a mask that varies by
    query row, each chunk is cut into pieces of QUERY_ROWS rows that take only the span of keys their rows may
    attend (a causal mask: the keys up to the piece's last row, ~5/8 of the scores at 4 pieces)."""
    B, nh, tq, _ = q.shape
    tk, n_kv = k.shape[2], k.shape[1]
    rep, every = nh // n_kv, slice(None)
    if B * nh * tq * tk <= CHUNK_SCORES:
        chunks = [(every, every, every, every)]
    elif groups := CHUNK_SCORES // (rep * tq * tk):  # KV heads a chunk
        chunks = [(slice(b, b + 1), slice(j * rep, min(j + groups, n_kv) * rep), slice(j, min(j + groups, n_kv)), every)
                  for b in range(B) for j in range(0, n_kv, groups)]
    else:
        rows = max(1, CHUNK_SCORES // (rep * tk))  # query positions a chunk
        chunks = [(slice(b, b + 1), slice(j * rep, (j + 1) * rep), slice(j, j + 1), slice(t, t + rows))
                  for b in range(B) for j in range(n_kv) for t in range(0, tq, rows)]
    if mask is None or mask.shape[2] == 1 or tq < 2 * QUERY_ROWS:
        return [(*c, every) for c in chunks]
    spans = _key_spans(mask, tq, tk)
    return [(rows, heads, kv, qs2, ks) for rows, heads, kv, qs in chunks for qs2, ks in _pieces(spans, qs, tq, tk)]


def _key_spans(mask: torch.Tensor, tq: int, tk: int) -> list[tuple[int, int]]:
    """For each piece of QUERY_ROWS query rows, the span [lo, hi) of keys any of its rows (in any batch row or head)
    may attend; (0, 1) where none may (its rows get P = 0 as before)."""
    allowed = torch.isfinite(mask).flatten(0, 1).any(0)  # (T_q, T_k)
    spans = []
    for t in range(0, tq, QUERY_ROWS):
        keys = allowed[t:t + QUERY_ROWS].any(0).nonzero()
        spans.append((int(keys[0]), int(keys[-1]) + 1) if len(keys) else (0, 1))
    return spans


def _pieces(spans: list[tuple[int, int]], qs: slice, tq: int, tk: int) -> list[tuple[slice, slice]]:
    """Chunk rows ``qs`` as (query rows, key span) pieces; neighbouring pieces of one span merged."""
    start, stop = qs.start or 0, tq if qs.stop is None else min(qs.stop, tq)
    out: list[tuple[slice, slice]] = []
    t = start
    while t < stop:
        end = min(stop, (t // QUERY_ROWS + 1) * QUERY_ROWS)
        lo, hi = spans[t // QUERY_ROWS]
        if out and out[-1][1] == slice(lo, hi):
            out[-1] = (slice(out[-1][0].start, end), out[-1][1])
        else:
            out.append((slice(t, end), slice(lo, hi)))
        t = end
    return [(q, slice(None) if (k.start, k.stop) == (0, tk) else k) for q, k in out]


def _part(mask: torch.Tensor | None, c: Chunk) -> torch.Tensor | None:
    """The (B | 1, nh | 1, T_q | 1, T_k) mask's part for chunk ``c`` (a dim of size 1 is broadcast, not cut)."""
    if mask is None:
        return None
    rows, heads, _, qs, ks = c
    every = slice(None)
    return mask[rows if mask.shape[0] > 1 else every, heads if mask.shape[1] > 1 else every,
                qs if mask.shape[2] > 1 else every, ks]


class _BmmAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):  # type: ignore[override]
        rep = q.shape[1] // k.shape[1]
        empty_rows = mask is not None and not bool(torch.isfinite(mask).any(-1).all())
        qs = q * scale  # (B, nh, T_q, d): the scale on Q, not on the (T_q × T_k) scores
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # (B, nh, T_q, d)
        for c in _chunks(q, k, mask):
            rows, heads, kv, qr, ks = c
            p = _probs(qs[rows, heads, qr], _grouped(k[rows, kv, ks], rep), _part(mask, c), empty_rows)
            out[rows, heads, qr] = torch.matmul(_low(p, v.dtype), _grouped(v[rows, kv, ks], rep))
        ctx.save_for_backward(qs, k, v, out, mask)
        ctx.scale, ctx.rep, ctx.empty_rows = scale, rep, empty_rows
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        qs, k, v, out, mask = ctx.saved_tensors
        scale, rep = ctx.scale, ctx.rep
        d_out = d_out.to(v.dtype).contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)  # dK, dV: summed over query chunks
        for c in _chunks(qs, k, mask):
            rows, heads, kv, qr, ks = c
            qc, do = qs[rows, heads, qr], d_out[rows, heads, qr]
            kg, vg = _grouped(k[rows, kv, ks], rep), _grouped(v[rows, kv, ks], rep)
            p = _probs(qc, kg, _part(mask, c), ctx.empty_rows)  # recomputed: the same operations give the same P
            dv[rows, kv, ks] += _ungrouped(torch.matmul(_low(p, v.dtype).transpose(-2, -1), do), rep)
            ds = _scratch("ds", p.shape, torch.float32)
            if v.dtype == torch.float32:
                torch.matmul(do, vg.transpose(-2, -1), out=ds)  # dP
            else:
                ds.copy_(torch.matmul(do, vg.transpose(-2, -1), out=_scratch("low", p.shape, v.dtype)))
            delta = (do.float() * out[rows, heads, qr].float()).sum(-1, keepdim=True)  # rowsum(dO ⊙ O)
            ds = _low(ds.sub_(delta).mul_(p), qs.dtype)
            # dS = P ⊙ (dP − δ); dQ = dS·K·scale, dK = dSᵀ·(Q·scale)
            dq[rows, heads, qr] = torch.matmul(ds, kg).mul_(scale)
            dk[rows, kv, ks] += _ungrouped(torch.matmul(ds.transpose(-2, -1), qc), rep)
        return dq, dk, dv, None, None


def bmm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + mask)·V with the weights recomputed in the backward.

    q (B, nh, T_q, d); k, v (B, n_kv, T_k, d), nh a multiple of n_kv; mask: an additive float mask broadcastable
    to (B, nh, T_q, T_k) (−∞ where a key may not be attended) or None. A row with no key gets zeros.
    """
    return _BmmAttention.apply(q, k, v, None if mask is None else _as_4d(mask.float()), scale)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask.view((1,) * (4 - mask.dim()) + mask.shape)  # (B | 1, nh | 1, T_q | 1, T_k | 1)
