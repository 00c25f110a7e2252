"""BERT-family encoders (Devlin et al. 2019, §3) and sentence embeddings from them.

BERT is the paper's encoder (post-norm layers, GELU feed-forward) with learned absolute positions
and segment ("token type") embeddings, summed and layer-normalised at the input:

    h_0 = LN(E[x] + P[0:T] + S[segment])
    h_l = LN(h' + FFN(h')),  h' = LN(h_{l-1} + Attn(h_{l-1}))

MiniLM (Wang et al. 2020) distils BERT into the same architecture with fewer, narrower layers.
Sentence-BERT (Reimers & Gurevych 2019, §3) turns token states into one sentence vector by mean
pooling over the non-padding tokens; all-MiniLM-L6-v2 then L2-normalises it, so that the dot
product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LayerNorm, LearnedPositionalEmbedding, TransformerLayer


@dataclass
class BertConfig:
    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"


class Bert(nn.Module):
    """The encoder: token ids (B, T) → contextual token states (B, T, d_model)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model)
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, norm_first=False, norm="layernorm",
                             norm_eps=cfg.norm_eps, ffn=cfg.activation, bias=True)
            for _ in range(cfg.n_layers)
        )

    def forward(self, idx: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx, attention_mask (1 = token, 0 = padding), token_type_ids: (B, T) → (B, T, d_model).

        ``inputs_embeds`` (B, T, d) replaces the token embedding lookup (soft prompts, P-tuning).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) and inputs_embeds")
        tok = self.tok_embeddings(idx) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if token_type_ids is None:
            token_type_ids = torch.zeros(tok.shape[:2], dtype=torch.long, device=tok.device)
        x = self.pos_embeddings(tok) + self.type_embeddings(token_type_ids)
        x = self.emb_norm(x)  # (B, T, d)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t·h_t / max(Σ_t m_t, 1e-9): the average of the non-padding token states (B, T, d) → (B, d)."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


POOLING = {"mean": mean_pool, "cls": cls_pool}


class SentenceEncoder(nn.Module):
    """Encoder + pooling (+ L2 normalisation): the sentence-transformers pipeline of BERT-like models."""

    def __init__(self, encoder: Bert, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling {pooling!r} is not supported (supported: {sorted(POOLING)})")
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and mask → (B, d_model) sentence embeddings."""
        h = self.encoder(idx, attention_mask, token_type_ids)
        e = POOLING[self.pooling](h, attention_mask)
        return F.normalize(e, p=2, dim=-1) if self.normalize else e
