"""Scaled dot-product attention and multi-head attention.

Attention(Q, K, V) = softmax(QKᵀ/√d_k + M)·V            (Vaswani et al. 2017, eq. 1)
MultiHead(Q, K, V) = Concat(head_1, …, head_h)·W^O,
    head_i = Attention(Q·W_i^Q, K·W_i^K, V·W_i^V)         (§3.2.2)

Grouped-query attention (Ainslie et al. 2023) shares each K/V head among ``n_heads // n_kv_heads``
query heads; multi-query attention (Shazeer 2019) is the case ``n_kv_heads == 1``.

Options of today's families: q/k RMSNorm before RoPE (per head: Qwen3, Gemma 3 — Dehghani et al. 2023,
"Scaling Vision Transformers to 22B"; over the whole projection: OLMoE), a softmax scale other than 1/√d_k
(Gemma's query_pre_attn_scalar) and logit soft-capping, scores ← c·tanh(scores/c) (Gemma 2).
"""

from __future__ import annotations

import math
import weakref
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .fused import cat_out_features
from .norm import RMSNorm
from .recompute import remember
from .train_attention import train_attention

AttentionImpl = Literal["math", "sdpa"]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q, k, v of shape (B, n_heads, T, head_dim); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: k has {k.shape[-2]} positions but v has {v.shape[-2]}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"attention: n_heads ({q.shape[1]}) must be a multiple of n_kv_heads (k {k.shape[1]}, v {v.shape[1]})"
        )


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand K/V heads for grouped-query attention: (B, n_kv, T, hd) → (B, n_kv·n_rep, T, hd)."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


def _heads_joined(out: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hd) → (B, T, nh·hd), the output projection's input."""
    B, nh, T, hd = out.shape
    return out.transpose(1, 2).reshape(B, T, nh * hd)


_ADDITIVE: tuple[weakref.ref, weakref.ref] | None = None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as the additive one SDPA would make of it (0 / −∞), made once for the layers that share
    ``mask``: SDPA converts a bool mask in every layer, and under autograd every layer would keep its own copy
    (B·T²·4 bytes each: 64 MiB a layer at 4 × 2048 packed tokens). Both are held weakly here."""
    global _ADDITIVE
    if _ADDITIVE is not None:
        was, add = _ADDITIVE[0](), _ADDITIVE[1]()
        if was is mask and add is not None and add.dtype == dtype:
            return add
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE = (weakref.ref(mask), weakref.ref(add))
    return add


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    impl: AttentionImpl = "math",
    need_weights: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(QKᵀ/√d_k + bias + M)·V, with M = 0 where ``mask`` is True and −∞ where it is False.

    q: (B, nh, T_q, hd); k, v: (B, n_kv, T_k, hd) with nh a multiple of n_kv (GQA).
    mask: bool, broadcastable to (B, nh, T_q, T_k), True = may attend.
    bias: float additive bias broadcastable to the scores (ALiBi, T5 relative bias).

    ``softcap`` c: scores ← c·tanh(scores/c) before the mask (Gemma 2; forces the math path).
    ``impl="math"`` writes the equation out; ``impl="sdpa"`` calls torch's fused kernel. Both
    return zeros for a query row whose keys are all masked. Returns ``(out, weights)``; weights
    (B, nh, T_q, T_k) only with ``need_weights`` (which forces the math path).
    """
    _check_qkv(q, k, v)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be bool (True = may attend), got {mask.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_rep = q.shape[1] // k.shape[1]

    if impl == "sdpa" and not need_weights and softcap is None:
        # training on the CPU: C tiles or batched products, faster than torch's fused kernel there (train_attention)
        by_tiles = q.device.type == "cpu" and dropout_p == 0.0 and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)
        dt = torch.float32 if by_tiles else q.dtype
        if bias is not None:
            attn_mask = bias.to(dt) if mask is None else bias.to(dt).masked_fill(~mask, float("-inf"))
        else:
            attn_mask = None if mask is None else additive_mask(mask, dt)
        if by_tiles:  # gives a row with no key zeros itself
            return train_attention(q, k, v, attn_mask, scale), None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=n_rep > 1
        )
        if mask is not None:
            out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        return out, None
    if impl not in ("math", "sdpa"):
        raise ValueError(f"unknown attention impl {impl!r}; expected 'math' or 'sdpa'")
    row_has_key = None if mask is None else mask.any(dim=-1, keepdim=True)  # (..., T_q, 1)

    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T_q, T_k)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if row_has_key is not None:
        weights = weights.masked_fill(~row_has_key, 0.0)  # softmax of an all −∞ row is NaN
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v  # (B, nh, T_q, hd)
    return out, (weights if need_weights else None)


class KVCacheLike(Protocol):
    """What :class:`MultiHeadAttention` needs from a cache: append new K/V, return all of them.

    A cache with ``attends = True`` instead provides ``attend(q, k, v) -> out`` (B, n_heads, T, hd):
    it stores k, v and computes the attention itself (the engine's paged KV cache).
    """

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class RotaryLike(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-/multi-query) attention, for self- and cross-attention.

    Self-attention: ``forward(x)``. Cross-attention: ``forward(x, context=memory)``: queries from
    ``x``, keys and values from ``context`` (``kv_dim`` may differ from ``d_model``).
    Projections are named q_proj/k_proj/v_proj/o_proj, the names most checkpoints use.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        kv_dim: int | None = None,
        impl: AttentionImpl = "sdpa",
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        norm_offset: float = 0.0,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> None:
        """``qk_norm``: None, "head" (RMSNorm over each head's hd features) or "full" (over all of q's and
        k's features, OLMoE); ``scale``: the softmax scale (default 1/√head_dim); ``softcap``: score
        soft-capping; ``window``: the sliding window this layer's keys are limited to (read by the caches and
        the model's masks; the attention itself applies the mask it is given)."""
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
            head_dim = d_model // n_heads
        kv_dim = d_model if kv_dim is None else kv_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout, self.impl = dropout, impl
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias)
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.softcap, self.window, self.qk_norm = softcap, window, qk_norm
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, norm_eps, norm_offset)
            self.k_norm = RMSNorm(head_dim, norm_eps, norm_offset)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, norm_eps, norm_offset)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, norm_eps, norm_offset)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")
        self.qkv_proj: nn.Module | None = None  # set by fuse(): [W_Q | W_K | W_V] in one product
        self.last_weights: torch.Tensor | None = None  # filled when forward(need_weights=True)

    def fuse(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (inference only; see :mod:`attnkit.nn.fused`)."""
        if self.qkv_proj is None:
            self.qkv_proj = cat_out_features([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def _split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``context`` (B, T, kv_dim) → two (B, n_kv, T, hd); cached once for cross-attention."""
        return self._split(self.k_proj(context), self.n_kv_heads), self._split(self.v_proj(context), self.n_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rotary: RotaryLike | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        static_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, d_model) → (B, T, d_model).

        cache: a self-attention cache; the new K/V are appended and attention runs over all.
        static_kv: precomputed (K, V) of the encoder memory for cross-attention (computed once).
        rotary + positions: RoPE applied to q and k at the given absolute positions (T,) or (B, T).
        """
        if x.dim() != 3:
            raise ValueError(f"MultiHeadAttention expects x of shape (B, T, d_model), got {tuple(x.shape)}")
        if self.qkv_proj is not None and context is None and static_kv is None:
            B, T, _ = x.shape
            nh, nkv = self.n_heads, self.n_kv_heads
            qkv = self.qkv_proj(x)
            if self.qk_norm == "full":
                nq, nk = nh * self.head_dim, nkv * self.head_dim
                qkv = torch.cat([self.q_norm(qkv[..., :nq]), self.k_norm(qkv[..., nq:nq + nk]), qkv[..., nq + nk:]], -1)  # type: ignore[misc]
            qkv = qkv.view(B, T, nh + 2 * nkv, self.head_dim)  # (B, T, nh + 2·n_kv, hd)
            if self.qk_norm == "head":
                qkv = torch.cat([self.q_norm(qkv[:, :, :nh]), self.k_norm(qkv[:, :, nh:nh + nkv]), qkv[:, :, nh + nkv:]], 2)  # type: ignore[misc]
            qk = rotary.rotate_heads(qkv[:, :, :nh + nkv], inplace=not torch.is_grad_enabled()) \
                if hasattr(rotary, "rotate_heads") else None  # type: ignore[union-attr]
            if qk is None:
                qk = qkv[:, :, :nh + nkv]
            else:
                rotary = None  # q and k rotated together, in one pass
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)  # (B, nh, T, hd), (B, n_kv, T, hd)
            v = qkv[:, :, nh + nkv:].transpose(1, 2)
            return self._attend(q, k, v, mask, bias, rotary, positions, cache, need_weights)
        if static_kv is not None:
            q, (k, v) = self._split(self.q_proj(x), self.n_heads), static_kv
        elif self.qk_norm is None:
            q = self._split(self.q_proj(x), self.n_heads)  # (B, nh, T, hd)
            k, v = self.project_kv(x if context is None else context)  # (B, n_kv, T_k, hd)
        else:
            q, k = self.q_proj(x), self.k_proj(x if context is None else context)
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
            q, k = self._split(q, self.n_heads), self._split(k, self.n_kv_heads)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
            v = self._split(self.v_proj(x if context is None else context), self.n_kv_heads)
        return self._attend(q, k, v, mask, bias, None if static_kv is not None else rotary, positions,
                                 None if static_kv is not None else cache, need_weights)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     bias: torch.Tensor | None, rotary: RotaryLike | None, positions: torch.Tensor | None,
                     cache: KVCacheLike | None, need_weights: bool) -> torch.Tensor:
        """Rotary, the cache, attention and the output projection, from the projected q (B, nh, T, hd), k, v."""
        if rotary is not None:
            if positions is None:
                raise ValueError("rotary embeddings need the absolute positions of the new tokens")
            q, k = rotary(q, k, positions)
        if cache is not None and getattr(cache, "attends", False):
            # a cache that attends itself (the engine's paged KV: many sequences in one packed row)
            # stores the new K/V and returns the attention output; mask and bias are its business
            out = cache.attend(q, k, v)  # type: ignore[attr-defined]
            self.last_weights = None
            return self.o_proj(_heads_joined(out))
        if cache is not None:
            k, v = cache.update(k, v)
        out, weights = scaled_dot_product_attention(
            q, k, v, mask=mask, bias=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            impl=self.impl, need_weights=need_weights, softcap=self.softcap,
        )
        self.last_weights = weights
        return self.o_proj(remember(_heads_joined(out), _heads_joined, out))
