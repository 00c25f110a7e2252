"""The Llama family of decoder-only language models, composed of attnkit's blocks.

Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", §2.2) is the
GPT decoder with three changes: pre-normalisation with RMSNorm (Zhang & Sennrich 2019), the
SwiGLU feed-forward (Shazeer 2020) and rotary position embeddings (Su et al. 2021). Its
descendants differ only in configuration, so one file covers them all:

- Llama 2 / Mistral / SmolLM / SmolLM2: grouped-query attention (Ainslie et al. 2023), tied or untied
  output embedding; Mistral adds sliding-window attention (Jiang et al. 2023, §2).
- Llama 3: RoPE frequencies rescaled for long context (``rope_scaling={"rope_type": "llama3", ...}``).
- Qwen2 / Qwen2.5: bias on the q, k, v projections (not on o).

    h_0 = E[x]
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}));  h_l ← h_l + SwiGLU(RMSNorm(h_l))
    logits = RMSNorm(h_L) · W_outᵀ           (W_out = E when the embeddings are tied)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache, RMSNorm, RotaryEmbedding, TransformerLayer, causal_mask


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    d_ff: int = 11008
    head_dim: int | None = None  # default d_model // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    rope_freq_factors: list[float] | None = None  # llama.cpp's per-frequency divisors (GGUF rope_freqs)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: keys at most this many positions back
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (e.g. the checkpoint's model_type)

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """θ_i = base^(−2i/d), then the checkpoint's frequency scaling. Computed on the CPU in float64.

    "linear" (position interpolation, Chen et al. 2023): θ_i / factor.
    "llama3": long wavelengths (> original_context / low_freq_factor) are divided by ``factor``, short
    ones (< original_context / high_freq_factor) kept, the band between interpolated smoothly —
    as in Meta's reference code for Llama 3.1.
    """
    d = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))  # (d/2,)
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3)")
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64, device="cpu")
    return inv


class Llama(nn.Module):
    """Decoder-only Transformer: embeddings, ``n_layers`` pre-norm TransformerLayers, RMSNorm, LM head."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            TransformerLayer(
                cfg.d_model, cfg.n_heads, cfg.d_ff, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.hd,
                norm_first=True, norm="rmsnorm", norm_eps=cfg.norm_eps, ffn="swiglu",
                bias=cfg.mlp_bias, attn_bias=cfg.qkv_bias, attn_out_bias=cfg.o_bias,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output_head: nn.Module | None = None  # replaces the LM head when set (attnkit.quant: a quantized head)
        # inv_freq is built on the CPU explicitly so the model can be constructed on the meta device
        self.rotary = RotaryEmbedding(cfg.hd, inv_freq=rope_inv_freq(cfg))

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def forward(self, idx: torch.Tensor | None, cache: list[KVCache] | None = None, last_only: bool = False,
                positions: torch.Tensor | None = None, logits_indices: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids → logits (B, T, vocab) (or (B, 1, vocab) with ``last_only``).

        With ``cache`` the tokens continue the cached sequence: their positions start at its length.
        The inference engine passes explicit ``positions`` (T,) of its packed row of many sequences,
        a per-layer cache that masks by itself, and ``logits_indices``: the only rows it needs logits of.
        ``inputs_embeds`` (B, T, d) replaces the embedding lookup (soft prompts, P-tuning).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) and inputs_embeds")
        B, T = idx.shape if idx is not None else inputs_embeds.shape[:2]  # type: ignore[union-attr]
        device = idx.device if idx is not None else inputs_embeds.device  # type: ignore[union-attr]
        if positions is None:
            start = cache[0].length if cache is not None else 0
            positions = torch.arange(start, start + T, device=device)  # (T,)
            mask = self._mask(T, start + T, device)  # (T, start+T) or None
        else:
            mask = None  # the cache (the engine's paged KV) knows which keys each token may see
        x = self.tok_embeddings(idx) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        rotary = self.rotary.at(positions)  # the angles once for all layers
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, rotary=rotary, positions=positions, cache=None if cache is None else cache[i])
        if logits_indices is not None:
            x = x[:, logits_indices]
        return self.logits(x[:, -1:] if last_only else x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, T, d) → RMSNorm → LM head → logits (B, T, vocab)."""
        x = self.norm(h)
        if self.output_head is not None:
            return self.output_head(x)  # (B, T, vocab)
        w = self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w)  # (B, T, vocab)

    def _mask(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
        w = self.cfg.sliding_window
        if q_len == 1 and (w is None or k_len <= w):
            return None  # one new token may attend to every cached one
        mask = causal_mask(q_len, k_len, device=device)
        if w is not None:  # query at absolute position i sees keys j with i − j < w
            i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
            mask = mask & (i - torch.arange(k_len, device=device)[None, :] < w)
        return mask
