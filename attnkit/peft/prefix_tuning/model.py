"""Prefix tuning (Li & Liang 2021, §4.2): every layer attends to P extra trainable key/value positions.

    h_i = P_θ[i]            for the prefix positions i < P
    P_θ[i, :] = MLP_θ(P'_θ[i, :])   while training with the reparameterisation (§4.3)

The encoder outputs (P, n_layers·2·n_kv·hd), HF PEFT's ``prompt_embeddings`` layout: for layer l the
keys are slot 2l and the values slot 2l+1. The prefix K/V enter attention through the cache protocol
(:class:`PrefixCache`): the keys are not rotated (RoPE applies to the real tokens only), and the real
tokens' positions start at P, as in transformers when a cache of P positions is passed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..prompt_encoder import VirtualTokens
from .config import PrefixTuningConfig


class PrefixEncoder(VirtualTokens):
    def __init__(self, config: PrefixTuningConfig) -> None:
        assert config.token_dim is not None and config.num_layers is not None
        width = config.num_layers * 2 * config.token_dim
        self.projection = config.prefix_projection
        super().__init__(config.num_virtual_tokens, config.token_dim if self.projection else width)
        if self.projection:
            h = config.encoder_hidden_size or config.token_dim
            self.transform = nn.Sequential(nn.Linear(config.token_dim, h), nn.Tanh(), nn.Linear(h, width))

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        return self.transform(table) if self.projection else table


def split_prefix(flat: torch.Tensor, n_layers: int, n_kv: int, head_dim: int, batch: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P, L·2·n_kv·hd) → per layer (K, V), each (B, n_kv, P, hd)."""
    P = flat.shape[0]
    kv = flat.view(P, n_layers * 2, n_kv, head_dim).permute(1, 2, 0, 3)  # (2L, n_kv, P, hd)
    kv = kv[:, None].expand(-1, batch, -1, -1, -1)  # (2L, B, n_kv, P, hd)
    return [(kv[2 * l], kv[2 * l + 1]) for l in range(n_layers)]


class PrefixCache:
    """A per-layer cache that starts with the prefix: ``update`` returns [prefix; new] K/V.

    ``length`` = P, so a model run with these caches places its tokens at positions P, P+1, ...
    and builds a causal mask of width P + T in which every token sees the whole prefix.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # (B, n_kv, P, hd)
        self.length = k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = torch.cat([self.k.to(k.dtype), k], dim=2)
        self.v = torch.cat([self.v.to(v.dtype), v], dim=2)
        self.length = self.k.shape[2]
        return self.k, self.v
