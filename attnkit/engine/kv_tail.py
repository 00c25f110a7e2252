"""A 4-bit K/V cache's exact blocks: each query reads the keys of its own block as 8-bit rows, earlier blocks 4-bit.

KIVI (Liu et al. 2024) keeps the most recent keys in full precision; here the unit is the query's own paged block.
Measured on the default model (benchmarks/kv_quant_ablation.py, docs/long_context.md): q4_0 K/V cost +7.5%
perplexity, almost all of it from the keys (values alone +0.25%) and from the keys nearest the query — read exactly
within its own 16-token block, the cost falls to +1.7% (KL 0.035; kept as q8_0 rows in 32-token blocks, the
engine's default: KL 0.0240, +1.5%).

Every row is written twice: quantized into the pool, which is what earlier-block reads, the prefix cache,
copy-on-write and evictions use, and as a q8_0 row (which costs 0.06% perplexity against float16, at half its bytes)
into the tail slot of its block. A block holds a slot while it
is being written and gives it back once full; so at most one slot per running sequence is held between steps, plus
those of the blocks a prompt chunk fills within one step. Which keys a query reads exactly depends only on its
position, never on what shares the step (batch invariance), and a prefix-cache hit is whole blocks, so a reused
block is never the one a query reads exactly. Where a block's first rows were not written through the tail
(a draft rolled back across a block boundary, slots exhausted), those rows are read from the pool. The C kernels
read the tail through ``ak_kv_tail``; PagedKVCache's PyTorch paths (gathered decode, masked prompt chunks) alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kv_format import kv_format


ROW = kv_format("q8_0")  # the tail's rows


class KVTail:
    """Tail slots (n_layers, n_kv, slots, block_size, q8_0 row bytes) for K and V, and which block holds which."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.slots, self.block_size = k.shape[2], k.shape[3]
        self.slot_of: dict[int, int] = {}  # block id → its slot
        self.exact_from: dict[int, int] = {}  # block id → the first offset in it written through the slot
        self.free = list(range(self.slots - 1, -1, -1))
        self.full: set[int] = set()  # blocks written to their end: their slots may be taken back
        self.in_use: Callable[[int], bool] | None = None  # block id → still referenced (the block manager's; reclaim)

    @staticmethod
    def shape(n_layers: int, n_kv: int, slots: int, block_size: int, hd: int) -> tuple[int, ...]:
        return (n_layers, n_kv, slots, block_size, ROW.row_width(hd))

    @staticmethod
    def bytes_per_slot(n_layers: int, n_kv: int, block_size: int, hd: int) -> int:
        return 2 * n_layers * n_kv * block_size * ROW.row_bytes(hd)

    def slot(self, block: int, offset: int) -> int:
        """The slot a row of ``block`` at ``offset`` is written to (taken when the block has none; -1: none free)."""
        self.full.discard(block)
        s = self.slot_of.get(block)
        if s is not None:
            if offset == 0:  # the block is written from its start again (a freed block handed out anew)
                self.exact_from[block] = 0
            return s
        if not self.free:
            self.reclaim()
            if not self.free:
                return -1
        s = self.slot_of[block] = self.free.pop()
        self.exact_from[block] = offset
        return s

    def exact(self, block: int) -> tuple[int, int]:
        """(slot, first exact offset) of a query's own block; (-1, 0) without one."""
        s = self.slot_of.get(block)
        return (-1, 0) if s is None else (s, self.exact_from[block])

    def filled(self, blocks: list[int]) -> None:
        """``blocks`` were written to their end: no later query reads them exactly (unless a draft rolls back)."""
        self.full.update(b for b in blocks if b in self.slot_of)

    def release(self, block: int) -> None:
        s = self.slot_of.pop(block, None)
        if s is not None:
            del self.exact_from[block]
            self.full.discard(block)
            self.free.append(s)

    def reclaim(self) -> None:
        """Take back the slots of full blocks and of blocks no sequence holds any more (finished or preempted)."""
        for block in [b for b in self.slot_of if b in self.full or (self.in_use is not None and not self.in_use(b))]:
            self.release(block)

    def copy(self, src: int, dst: int) -> None:
        """Copy-on-write of a partly written block: its tail rows go with it."""
        if src not in self.slot_of:
            return
        s = self.slot(dst, 0)
        if s >= 0:
            t = self.slot_of[src]
            self.k[:, :, s], self.v[:, :, s] = self.k[:, :, t], self.v[:, :, t]
            self.exact_from[dst] = self.exact_from[src]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """New rows k, v (n_kv, T, hd) → the tail as q8_0 rows: row t to slot slots[t], offset rows[t] (slots[t] < 0:
        skipped)."""
        keep = slots >= 0
        if not bool(keep.any()):
            return
        s, r = slots[keep], rows[keep]
        self.k[layer][:, s, r] = ROW.quantize(k[:, keep])
        self.v[layer][:, s, r] = ROW.quantize(v[:, keep])
