"""The decoder's key/value cache for sequential decoding.

At step t the decoder's self-attention needs K and V of positions 0…t; all but the newest were
computed at earlier steps, so they are kept instead of recomputed (t new projections instead of
t(t+1)/2 over a whole generation). The encoder–decoder attention's K/V depend only on the encoder
output and are computed once per source (``MultiHeadAttention.project_kv``).

This contiguous cache serves the seq2seq decoder and single-stream decoding; the inference
engine's paged cache implements the same ``update`` protocol.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer self-attention cache with contiguous storage of shape (B, n_kv, T, hd).

    Storage grows by doubling, so appending one step is amortised O(1) copies.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv, T_new, hd); return all cached (B, n_kv, length, hd)."""
        t_new = k.shape[2]
        if self._k is None:
            cap = max(16, t_new)
            self._k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        elif k.shape[0] != self._k.shape[0] or k.shape[1] != self._k.shape[1] or k.shape[3] != self._k.shape[3]:
            raise ValueError(
                f"KVCache.update: new keys {tuple(k.shape)} do not match cached (B, n_kv, ·, hd) = "
                f"{(self._k.shape[0], self._k.shape[1], '·', self._k.shape[3])}"
            )
        assert self._v is not None
        need = self.length + t_new
        if need > self._k.shape[2]:
            cap = max(need, 2 * self._k.shape[2])
            grow = cap - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[3])], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[3])], dim=2)
        self._k[:, :, self.length:need] = k
        self._v[:, :, self.length:need] = v
        self.length = need
        return self._k[:, :, :need], self._v[:, :, :need]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the K/V of the surviving hypotheses)."""
        if self._k is not None:
            assert self._v is not None
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


class DecoderCache:
    """Everything one sequential decode carries between steps for an encoder–decoder model."""

    def __init__(self, n_layers: int, cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.self_attn = [KVCache() for _ in range(n_layers)]
        self.cross_kv = cross_kv  # per layer (K, V) of the encoder memory, computed once

    @property
    def length(self) -> int:
        return self.self_attn[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.self_attn:
            c.reorder(index)
        if self.cross_kv is not None:
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
