"""Batched variable-length attention over block tables (PagedAttention, Kwon et al. 2023).

The whole step is one packed row of tokens (1, T_total): every sequence's new tokens, one after
another, so the linear layers see no padding. Per layer, :class:`PagedKVCache` plugs into
:class:`~attnkit.nn.MultiHeadAttention` through the cache protocol: it writes the new K/V into
their slots of the block pool and runs attention itself (``attends = True``):

- decodes (one new token each) are batched: each sequence's blocks are gathered into a padded
  (B, n_kv, L, hd) view and one masked SDPA call covers them all;
- prefill chunks attend, one call each, to their cached prefix plus themselves (causal).

The same code runs on CUDA tensors; only the pool's device changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nn.attention import scaled_dot_product_attention


@dataclass
class PrefillChunk:
    start: int  # offset in the packed tokens
    end: int
    context_len: int  # keys it attends to: cached prefix + the chunk
    block_table: torch.Tensor  # (n_blocks,) covering context_len
    mask: torch.Tensor  # (n, context_len) bool


@dataclass
class AttentionMetadata:
    """Everything about one step's layout; built once per step, shared by all layers."""

    slots: torch.Tensor  # (T_total,) flat slot (block * block_size + offset) of each new token
    decode_index: torch.Tensor | None = None  # (B_d,) positions in the packed row
    decode_tables: torch.Tensor | None = None  # (B_d, max_blocks)
    decode_mask: torch.Tensor | None = None  # (B_d, 1, 1, max_blocks * block_size)
    prefills: list[PrefillChunk] = field(default_factory=list)
    scratch: list[torch.Tensor] = field(default_factory=list)  # the decode gather's buffers, reused by every layer


class PagedKVCache:
    """One layer's view of the block pool; implements the ``attends`` side of the cache protocol."""

    attends = True

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        self.k_pool, self.v_pool = k_pool, v_pool  # (num_blocks, block_size, n_kv, hd)
        self.meta: AttentionMetadata | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("PagedKVCache attends itself: MultiHeadAttention calls attend(), not update()")

    def _write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        n_kv, hd = self.k_pool.shape[2:]
        self.k_pool.view(-1, n_kv, hd).index_copy_(0, slots, k[0].transpose(0, 1))
        self.v_pool.view(-1, n_kv, hd).index_copy_(0, slots, v[0].transpose(0, 1))

    def _gather(self, tables: torch.Tensor, scratch: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, nb) block ids → K, V of shape (B, n_kv, nb * block_size, hd).

        ``index_select`` on the flattened pool copies whole blocks (several times faster than
        advanced indexing on the CPU); ``scratch`` (two buffers shared by all layers of a step)
        saves allocating the copies again for every layer.
        """
        B, nb = tables.shape
        bs, n_kv, hd = self.k_pool.shape[1:]
        flat_k, flat_v, idx = self.k_pool.view(-1, bs * n_kv * hd), self.v_pool.view(-1, bs * n_kv * hd), tables.view(-1)
        if scratch is None:
            k, v = flat_k.index_select(0, idx), flat_v.index_select(0, idx)
        else:
            if not scratch:
                scratch += [flat_k.new_empty(B * nb, bs * n_kv * hd), flat_v.new_empty(B * nb, bs * n_kv * hd)]
            k = torch.index_select(flat_k, 0, idx, out=scratch[0])
            v = torch.index_select(flat_v, 0, idx, out=scratch[1])
        return k.view(B, nb * bs, n_kv, hd).transpose(1, 2), v.view(B, nb * bs, n_kv, hd).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, nh, T, hd), new k/v (1, n_kv, T, hd) → attention output (1, nh, T, hd)."""
        meta = self.meta
        assert meta is not None, "the model runner sets the step's metadata before the forward"
        self._write(k, v, meta.slots)
        out = torch.empty_like(q)
        if meta.decode_index is not None:
            assert meta.decode_tables is not None
            kd, vd = self._gather(meta.decode_tables, meta.scratch)
            qd = q[0][:, meta.decode_index].transpose(0, 1).unsqueeze(2)  # (B_d, nh, 1, hd)
            od, _ = scaled_dot_product_attention(qd, kd, vd, mask=meta.decode_mask, impl="sdpa")
            out[0][:, meta.decode_index] = od.squeeze(2).transpose(0, 1)
        for p in meta.prefills:
            qp = q[:, :, p.start:p.end]
            if p.context_len == p.end - p.start:  # nothing cached before: the chunk's own K/V
                kp, vp = k[:, :, p.start:p.end], v[:, :, p.start:p.end]
            else:
                kp, vp = self._gather(p.block_table[None])
                kp, vp = kp[:, :, :p.context_len], vp[:, :, :p.context_len]
            out[:, :, p.start:p.end], _ = scaled_dot_product_attention(qp, kp, vp, mask=p.mask, impl="sdpa")
        return out
