"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.3).

The decoder-only Transformer of GPT-1 with pre-normalisation (LayerNorm moved to the input of each
sublayer, plus a final LayerNorm), learned absolute positions and the tanh approximation of GELU:

    h_0 = E[x] + P[0:T]
    h_l = h_{l-1} + Attn(LN(h_{l-1}));  h_l ← h_l + FFN_gelu(LN(h_l))
    logits = LN_f(h_L) · Eᵀ                  (output embedding tied to the input one)

Checkpoints store q, k, v as one fused ``c_attn`` Conv1D (weight (d, 3d), i.e. transposed); the
loader splits and transposes it into the attention block's q/k/v projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache, LayerNorm, LearnedPositionalEmbedding, TransformerLayer, causal_mask
from .llama import run_block


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # HF "gelu_new"

    @property
    def n_kv_heads(self) -> int:  # every head has its own keys and values (the engine sizes its KV pool by these)
        return self.n_heads

    @property
    def hd(self) -> int:
        return self.d_model // self.n_heads


class GPT2(nn.Module):
    gradient_checkpointing: bool = False  # in training, each block recomputed in the backward (run_block)

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, norm_first=True, norm="layernorm",
                             norm_eps=cfg.norm_eps, ffn=cfg.activation, bias=True)
            for _ in range(cfg.n_layers)
        )
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def forward(self, idx: torch.Tensor | None, cache: list[KVCache] | None = None, last_only: bool = False,
                inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) → logits (B, T, vocab); with ``cache`` the tokens continue the cached sequence.

        ``inputs_embeds`` (B, T, d) replaces the token embedding lookup (soft prompts, P-tuning). The
        inference engine passes explicit ``positions`` (T,) of its packed row of many sequences, a
        per-layer cache that masks by itself, and ``logits_indices``: the only rows it needs logits of.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) and inputs_embeds")
        tok = self.tok_embeddings(idx) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T = tok.shape[:2]
        if positions is not None:
            x = self.pos_embeddings(tok, positions=positions)  # (B, T, d)
            mask = None  # the engine's paged cache knows which keys each token may see
        else:
            start = cache[0].length if cache is not None else 0
            x = self.pos_embeddings(tok, offset=start)  # (B, T, d)
            mask = None if T == 1 else causal_mask(T, start + T, device=tok.device)  # (T, start+T)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            x = run_block(layer, x, recompute, None if cache is None else cache[i], mask=mask)
        if logits_indices is not None:
            x = x[:, logits_indices]
        x = self.norm(x[:, -1:] if last_only else x)
        return F.linear(x, self.tok_embeddings.weight)  # (B, T, vocab)
