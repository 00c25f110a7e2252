"""Attention for training on the CPU: the C kernels' tiles (kernels/train_attention.c) where the CPU has 512-bit
vectors, else PyTorch's batched products (:mod:`.bmm_attention`).

    S = Q·Kᵀ·scale + M        P = softmax(S) by rows        O = P·V
    dV = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = dS·K·scale    dK = dSᵀ·Q·scale

FlashAttention's forward and backward (Dao et al. 2022, Algorithms 1 and 4): tiles of 32 query rows × 64 keys stay
in L1, the forward keeps a running max and sum per row and stores only O and each row's log-sum-exp, the backward
recomputes P tile by tile, and a tile the mask leaves empty (a causal mask's upper triangle, another document of a
packed row) is skipped in both. bf16 inputs (autocast) multiply by vdpbf16ps (AVX512-BF16), P and dS rounded to
bf16 as they enter a product, as in PyTorch's bf16 products; float32 inputs by float32 FMAs. For the default
model's 9 heads of 64 over 4 × 256 packed tokens in bf16, a layer's forward and backward took 4.3–4.7 ms against
7.9–11.4 ms by batched products (docs/finetune.md, session 28).
"""

from __future__ import annotations

import torch

from .bmm_attention import _as_4d, bmm_attention

TILED = True  # the C kernels' tiles where they take the call (False: always the batched products)


class _TiledAttention(torch.autograd.Function):
    """The same attention in the C kernels' tiles (kernels/train_attention.c): FlashAttention's forward and backward,
    tiles that the mask leaves empty skipped (a causal mask's upper triangle); only O and each row's log-sum-exp are
    kept for the backward. bf16 inputs (autocast) multiply by vdpbf16ps, P and dS rounded to bf16 as PyTorch's bf16
    products round them; others in float32."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, lib):  # type: ignore[override]
        B, nh, T, D = q.shape
        nkv, tk = k.shape[1], k.shape[2]
        bf16 = q.dtype == k.dtype == v.dtype == torch.bfloat16
        if bf16:
            qs, kf, vf = q.contiguous(), k.contiguous(), v.contiguous()
        else:
            qs, kf, vf = (q.float() * scale).contiguous(), k.float().contiguous(), v.float().contiguous()
        m, bstride = _c_mask(mask, B, T, tk)
        out, lse = torch.empty(B, nh, T, D), torch.empty(B, nh, T)
        args = (qs.data_ptr(), kf.data_ptr(), vf.data_ptr(), 0 if m is None else m.data_ptr(), bstride, out.data_ptr(),
                lse.data_ptr(), B, nh, nkv, T, tk, D)
        threads = torch.get_num_threads()
        rc = lib.ak_attn_train_forward_bf16(*args, scale, threads) if bf16 else lib.ak_attn_train_forward(*args, threads)
        if rc:
            raise RuntimeError(f"ak_attn_train_forward refused its arguments ({rc})")
        out = out.to(q.dtype)  # what the backward reads of O: bf16 under autocast, as the batched products keep it
        ctx.save_for_backward(qs, kf, vf, m, out, lse)
        ctx.scale, ctx.bstride, ctx.lib, ctx.bf16, ctx.dtypes = scale, bstride, lib, bf16, (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        qs, kf, vf, m, out, lse = ctx.saved_tensors
        out = out.contiguous() if ctx.bf16 else out.float().contiguous()
        B, nh, T, D = qs.shape
        nkv, tk = kf.shape[1], kf.shape[2]
        do = (d_out.to(torch.bfloat16) if ctx.bf16 else d_out.float()).contiguous()
        dq, dk, dv = torch.empty(qs.shape), torch.empty(kf.shape), torch.empty(vf.shape)
        fn = ctx.lib.ak_attn_train_backward_bf16 if ctx.bf16 else ctx.lib.ak_attn_train_backward
        if fn(qs.data_ptr(), kf.data_ptr(), vf.data_ptr(), 0 if m is None else m.data_ptr(), ctx.bstride, out.data_ptr(),
              lse.data_ptr(), do.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, nh, nkv, T, tk, D, ctx.scale,
              torch.get_num_threads()):
            raise RuntimeError("ak_attn_train_backward refused its arguments")
        tq, tk_, tv = ctx.dtypes
        return dq.to(tq), dk.to(tk_), dv.to(tv), None, None, None


def _c_mask(mask: torch.Tensor | None, B: int, T: int, tk: int) -> tuple[torch.Tensor | None, int]:
    """The additive mask as the C kernels read it: (B | 1, T, T_k) float32 contiguous, and its batch stride (0: one
    mask for every batch row)."""
    if mask is None:
        return None, 0
    m = mask[:, 0].expand(mask.shape[0], T, tk).contiguous()
    return m, 0 if m.shape[0] == 1 else T * tk


def _tiled_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """The C library where its tiles take this call (a CPU, 512-bit kernels — with AVX512-BF16 for bf16 inputs —, a
    head size a multiple of 16 up to 256, a mask the same for every head), else None."""
    if q.device.type != "cpu" or q.shape[-1] % 16 or q.shape[-1] > 256 or (mask is not None and mask.shape[1] != 1):
        return None
    from ..kernels import cpu_flags, library

    bf16 = q.dtype == k.dtype == v.dtype == torch.bfloat16
    if not ({"avx512f", "avx512_bf16"} if bf16 else {"avx512f"}) <= cpu_flags():
        return None
    lib = library()
    return lib if lib is not None and lib.ak_attn_train_available(int(bf16)) else None


def train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + mask)·V for a training step on the CPU (the weights recomputed in the backward).

    q (B, nh, T_q, d); k, v (B, n_kv, T_k, d), nh a multiple of n_kv; mask: an additive float mask broadcastable
    to (B, nh, T_q, T_k) (−∞ where a key may not be attended) or None. A row with no key gets zeros.
    """
    lib = _tiled_kernels(q, k, v, None if mask is None else _as_4d(mask)) if TILED else None
    if lib is None:
        return bmm_attention(q, k, v, mask, scale)
    return _TiledAttention.apply(q, k, v, None if mask is None else _as_4d(mask.float()), scale, lib)
