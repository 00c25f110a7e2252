"""The original encoder–decoder Transformer ("Attention Is All You Need", Vaswani et al. 2017).

Encoder: N × [self-attention, FFN]; decoder: N × [masked self-attention, encoder–decoder
attention, FFN]; each sublayer in Add & Norm (post-norm by default, §5.4). Token embeddings are
multiplied by √d_model and summed with the positional encoding (§3.4, §3.5); the output projection
may share its weights with the target embedding, and source and target embeddings may be shared.

Training runs the decoder over the whole shifted target in one pass under the causal mask
(teacher forcing); inference calls :meth:`Seq2SeqTransformer.decode` one step at a time with a
:class:`~attnkit.nn.DecoderCache` (see ``attnkit.decoding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .json_config import JsonConfig
from ..nn import (
    DecoderCache,
    DecoderLayer,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerLayer,
    causal_mask,
    cross_attention_mask,
    make_norm,
    self_attention_mask,
)


@dataclass
class Seq2SeqConfig(JsonConfig):
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 1024
    positional: str = "sinusoidal"  # 'sinusoidal' | 'learned' | 'none'
    share_embeddings: bool = False  # one table for source and target tokens (needs one vocabulary)
    tie_output: bool = True  # output projection = target embedding (§3.4)
    norm_first: bool = False  # False: post-norm as in the paper
    final_norm: bool = False  # a LayerNorm after each stack (torch.nn.Transformer has one; needed with pre-norm)
    activation: str = "relu"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positional not in ("sinusoidal", "learned", "none"):
            raise ValueError(f"positional must be 'sinusoidal', 'learned' or 'none', got {self.positional!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size")
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def paper_base(cls, vocab_size: int = 37000) -> "Seq2SeqConfig":
        """Table 3, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, shared BPE vocabulary."""
        return cls(vocab_size, vocab_size, d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6,
                   d_ff=2048, dropout=0.1, share_embeddings=True, tie_output=True)


class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, norm_first=cfg.norm_first,
                             ffn=cfg.activation)
            for _ in range(cfg.n_encoder_layers)
        )
        self.norm = make_norm("layernorm", cfg.d_model, 1e-5) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T_src, d) embedded source → memory (B, T_src, d)."""
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, norm_first=cfg.norm_first,
                         ffn=cfg.activation)
            for _ in range(cfg.n_decoder_layers)
        )
        self.norm = make_norm("layernorm", cfg.d_model, 1e-5) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, self_mask: torch.Tensor | None = None,
                cross_mask: torch.Tensor | None = None, cache: DecoderCache | None = None,
                need_weights: bool = False) -> torch.Tensor:
        """x: (B, T_tgt, d) embedded target → (B, T_tgt, d)."""
        for i, layer in enumerate(self.layers):
            x = layer(
                x, memory, self_mask=self_mask, cross_mask=cross_mask,
                cache=None if cache is None else cache.self_attn[i],
                cross_kv=None if cache is None or cache.cross_kv is None else cache.cross_kv[i],
                need_weights=need_weights,
            )
        return self.norm(x) if self.norm is not None else x


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        if cfg.positional == "sinusoidal":
            self.pos: nn.Module | None = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_len)
        elif cfg.positional == "learned":
            self.pos = LearnedPositionalEmbedding(cfg.max_len, cfg.d_model)
        else:
            self.pos = None
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self._reset_parameters()
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    # -- embedding -------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor, vocab_size: int, what: str) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"{what} tokens must have shape (B, T), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{what} tokens must be int64 token ids, got dtype {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"{what} token ids must lie in [0, {vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = table(tokens) * math.sqrt(self.config.d_model)  # (B, T, d)
        if self.pos is not None:
            x = self.pos(x, offset=offset)
        return self.dropout(x)

    # -- the two halves ----------------------------------------------------------------------
    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (B, T_src) ids → memory (B, T_src, d) and the cross-attention mask (B, 1, 1, T_src)."""
        self._check_tokens(src, self.config.src_vocab_size, "source")
        src_mask = cross_attention_mask(src, self.config.pad_id)
        return self.encoder(self._embed(self.src_embed, src), mask=src_mask), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor,
               cache: DecoderCache | None = None, need_weights: bool = False) -> torch.Tensor:
        """Target ids → logits (B, T, V).

        Without a cache: the whole (shifted) target at once under the causal mask (training).
        With a cache: ``tgt_in`` holds only the new tokens, at positions cache.length onward.
        """
        self._check_tokens(tgt_in, self.config.tgt_vocab_size, "target")
        offset = 0 if cache is None else cache.length
        x = self._embed(self.tgt_embed, tgt_in, offset=offset)
        if cache is None:
            self_mask = self_attention_mask(tgt_in, self.config.pad_id, causal=True)
        else:  # queries are the newest positions; every cached key is in the past
            T = tgt_in.shape[1]
            self_mask = causal_mask(T, offset + T, device=tgt_in.device)[None, None] if T > 1 else None
        h = self.decoder(x, memory, self_mask=self_mask, cross_mask=src_mask, cache=cache, need_weights=need_weights)
        return self.generator(h)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, T_tgt, V) for every target position in one parallel pass."""
        memory, src_mask = self.encode(src)  # validates src
        if tgt_in.dim() == 2 and src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"batch sizes differ: source {src.shape[0]}, target {tgt_in.shape[0]}")
        return self.decode(tgt_in, memory, src_mask)  # validates tgt_in

    def init_cache(self, memory: torch.Tensor) -> DecoderCache:
        """A decoder cache whose cross-attention K/V are computed once from the encoder memory."""
        cross = [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        return DecoderCache(len(self.decoder.layers), cross_kv=cross)

    def cross_attention_weights(self) -> list[torch.Tensor | None]:
        """Per decoder layer, the last cross-attention weights (B, h, T_tgt, T_src) if requested."""
        return [layer.cross_attn.last_weights for layer in self.decoder.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
