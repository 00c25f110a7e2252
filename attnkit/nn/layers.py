"""Transformer layers: attention and FFN sublayers joined by "Add & Norm".

Post-norm, as in the paper (§5.4): x ← LayerNorm(x + Dropout(Sublayer(x))).
Pre-norm (GPT-2, Llama):           x ← x + Dropout(Sublayer(Norm(x))).
Sandwich (Gemma 2/3):              x ← x + Norm'(Sublayer(Norm(x)))   (``post_norms=True``).

:class:`TransformerLayer` is self-attention + FFN: the encoder layer of the paper, BERT's layer
(post-norm) and the decoder-only layer of GPT-2/Llama (pre-norm, causal mask).
:class:`DecoderLayer` adds encoder–decoder (cross) attention between the two (§3.1).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import AttentionImpl, KVCacheLike, MultiHeadAttention, RotaryLike
from .ffn import make_ffn
from .norm import make_norm


def add_norm(x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor], norm: nn.Module,
             dropout: nn.Module, norm_first: bool, post_norm: nn.Module | None = None) -> torch.Tensor:
    """Residual connection around ``sublayer`` with normalisation before (pre-norm) or after (post-norm);
    ``post_norm`` also normalises a pre-norm sublayer's output before the residual add (sandwich norm)."""
    drop = dropout.training and dropout.p > 0  # type: ignore[operator]
    if norm_first:
        h = sublayer(norm(x))
        if post_norm is not None:
            h = post_norm(h)
        return x + (dropout(h) if drop else h)
    h = sublayer(x)
    return norm(x + (dropout(h) if drop else h))


class TransformerLayer(nn.Module):
    """Self-attention sublayer then feed-forward sublayer, each wrapped in Add & Norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
        norm_first: bool = False,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        ffn: str = "relu",
        bias: bool = True,
        attn_bias: bool | None = None,
        attn_out_bias: bool | None = None,
        impl: AttentionImpl = "sdpa",
        norm_offset: float = 0.0,
        post_norms: bool = False,
        qk_norm: str | None = None,
        attn_scale: float | None = None,
        attn_softcap: float | None = None,
        window: int | None = None,
        moe: dict | None = None,
    ) -> None:
        """The options of today's decoder families (all off: the paper's / Llama's layer):
        ``norm_offset`` 1 — (1 + γ) RMSNorm; ``post_norms`` — sandwich norms; ``qk_norm``, ``attn_scale``,
        ``attn_softcap``, ``window`` — see :class:`MultiHeadAttention`; ``moe`` — the FFN is a sparse
        mixture of experts, ``moe`` holding :class:`~attnkit.nn.moe.SparseMoE`'s keyword arguments."""
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads, head_dim, bias=bias if attn_bias is None else attn_bias,
            out_bias=attn_out_bias, dropout=dropout if attn_dropout is None else attn_dropout, impl=impl,
            qk_norm=qk_norm, norm_eps=norm_eps, norm_offset=norm_offset, scale=attn_scale, softcap=attn_softcap,
            window=window,
        )
        self.norm1 = make_norm(norm, d_model, norm_eps, norm_offset)
        if moe is not None:
            from .moe import SparseMoE

            act = {"swiglu": "silu", "geglu": "gelu_tanh"}[ffn]
            self.ffn: nn.Module = SparseMoE(d_model, activation=act, bias=bias, **moe)
        else:
            self.ffn = make_ffn(ffn, d_model, d_ff, dropout=dropout, bias=bias)
        self.norm2 = make_norm(norm, d_model, norm_eps, norm_offset)
        self.post_attn_norm = make_norm(norm, d_model, norm_eps, norm_offset) if post_norms else None
        self.post_ffn_norm = make_norm(norm, d_model, norm_eps, norm_offset) if post_norms else None
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rotary: RotaryLike | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, d_model) → (B, T, d_model)."""
        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.self_attn(h, mask=mask, bias=bias, rotary=rotary, positions=positions, cache=cache,
                                  need_weights=need_weights)

        x = add_norm(x, attend, self.norm1, self.dropout, self.norm_first, self.post_attn_norm)
        return add_norm(x, self.ffn, self.norm2, self.dropout, self.norm_first, self.post_ffn_norm)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder–decoder attention, FFN — each in Add & Norm (§3.1)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        ffn: str = "relu",
        bias: bool = True,
        impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, bias=bias, dropout=dropout, impl=impl)
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, bias=bias, dropout=dropout, impl=impl)
        self.norm2 = make_norm(norm, d_model, norm_eps)
        self.ffn = make_ffn(ffn, d_model, d_ff, dropout=dropout, bias=bias)
        self.norm3 = make_norm(norm, d_model, norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        self_mask: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """x: (B, T_tgt, d) target states; memory: (B, T_src, d) encoder output (or ``cross_kv``)."""
        x = add_norm(x, lambda h: self.self_attn(h, mask=self_mask, cache=cache), self.norm1, self.dropout,
                     self.norm_first)
        x = add_norm(
            x, lambda h: self.cross_attn(h, context=memory, mask=cross_mask, static_kv=cross_kv, need_weights=need_weights),
            self.norm2, self.dropout, self.norm_first,
        )
        return add_norm(x, self.ffn, self.norm3, self.dropout, self.norm_first)
