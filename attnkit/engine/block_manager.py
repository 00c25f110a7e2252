"""The KV cache in fixed-size blocks with reference counts (PagedAttention, Kwon et al. 2023, §4).

A sequence's keys/values live in blocks of ``block_size`` token slots, anywhere in the pool; its
block table maps logical block i to a physical block. Blocks are shared by reference counting:

- prefix caching (vLLM's automatic prefix caching, SGLang's RadixAttention idea): a full block is
  registered under a *chained* hash h_i = hash(h_{i-1}, tokens of block i), so equal hashes mean
  equal prefixes; the token ids are compared on a hit all the same. Freed blocks keep their hash
  and are reused least-recently-freed first, so a later request with the same prefix still hits.
  A request for a LoRA adapter seeds its chain with the adapter's id: its K/V are its own.
- copy-on-write: the n completions of a request share the prompt's blocks; writing into a shared
  (partial) block first copies it (the copy is done by the model runner before the forward).
- sliding windows (Mistral, Gemma 2/3's local layers): a layer that sees only the last ``window`` keys
  never reads a block again once the window has passed it, so a manager with ``window`` set frees such
  blocks as the sequence advances (their table entries become -1): the KV memory of a long conversation
  stops growing at the window. A model whose layers differ (Gemma: local and global layers) keeps one
  manager per kind of layer, each with its own pool and block table (:class:`BlockGroups`; vLLM's hybrid
  KV cache manager). A freed windowed block keeps its hash like any other, so a later prompt with the same
  prefix still hits: a windowed table needs only the blocks its window sees at the match's end.
- attention sinks (StreamingLLM, Xiao et al. 2023): a request with ``kv_window`` keeps the blocks of its first
  ``attention_sinks`` tokens and of its last ``kv_window`` or more, and drops the blocks between from its
  table (:meth:`BlockManager.slide`), so it runs past the context in bounded memory. Its cache indices then
  trail its positions by the tokens dropped (``Sequence.kv_shift``); keys keep the rotation of their own
  position, so a window key's distance to the query is the true one, and the sinks are re-rotated by
  ``kv_shift`` (into blocks of their own: the originals stay as they were computed, perhaps shared) so that
  theirs is their distance in the cache, as StreamingLLM assigns positions within the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    adapter: int = 0  # the LoRA adapter whose K/V the block holds (0: the base model)


@dataclass
class BlockStats:
    num_blocks: int
    free_blocks: int
    used_blocks: int
    prefix_queries: int  # full prompt blocks looked up
    prefix_hits: int
    hit_rate: float


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    window: int | None = None  # its layers see the last `window` keys: blocks behind them are freed
    table: str = "block_table"  # the Sequence attribute holding this manager's block table
    blocks: list[Block] = field(init=False)
    free: deque[int] = field(init=False)
    cached: dict[int, int] = field(init=False, default_factory=dict)  # hash -> block id
    queries: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"BlockManager: num_blocks ({self.num_blocks}) and block_size ({self.block_size}) must be >= 1")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = deque(range(self.num_blocks))
        self._free_set = set(self.free)

    def table_of(self, seq: Sequence) -> list[int]:
        return getattr(seq, self.table)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def stats(self) -> BlockStats:
        return BlockStats(self.num_blocks, self.num_free, self.num_blocks - self.num_free, self.queries, self.hits,
                          self.hits / self.queries if self.queries else 0.0)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    @staticmethod
    def first_hash(seq: Sequence) -> int | None:
        """The chain's seed: a LoRA adapter changes every K/V, so each adapter has its own chains."""
        return None if seq.adapter == 0 else hash(("adapter", seq.adapter))

    def _take(self, block_id: int) -> Block:
        b = self.blocks[block_id]
        if b.ref_count == 0:
            self.free.remove(block_id)
            self._free_set.discard(block_id)
        b.ref_count += 1
        return b

    def _new_block(self) -> int:
        block_id = self.free.popleft()
        self._free_set.discard(block_id)
        b = self.blocks[block_id]
        if b.hash is not None and self.cached.get(b.hash) == block_id:
            del self.cached[b.hash]  # its old content is about to be overwritten
        b.hash, b.token_ids, b.adapter, b.ref_count = None, (), 0, 1
        return block_id

    def hashes(self, seq: Sequence, n: int) -> list[int]:
        """The chain hashes of the first ``n`` full blocks of ``seq`` (kept on the sequence: tokens never change)."""
        bs, hs = self.block_size, seq.block_hashes
        h = hs[-1] if hs else self.first_hash(seq)
        for i in range(len(hs), n):
            h = self.chain_hash(h, tuple(seq.tokens[i * bs:(i + 1) * bs]))
            hs.append(h)
        return hs[:n]

    def lookup(self, seq: Sequence, i: int, h: int) -> int | None:
        """The cached block holding block ``i`` of ``seq`` (chain hash ``h``, its tokens compared), or None."""
        block_id = self.cached.get(h)
        if block_id is None:
            return None
        b = self.blocks[block_id]
        tokens = tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])
        return block_id if b.token_ids == tokens and b.adapter == seq.adapter else None

    def take_prefix(self, seq: Sequence, ids: list[int | None]) -> None:
        """Start ``seq``'s table on cached blocks ``ids`` (None: a block behind the window, not needed: -1)."""
        table = self.table_of(seq)
        for block_id in ids:
            if block_id is not None:
                self._take(block_id)
            table.append(-1 if block_id is None else block_id)

    def match_prefix(self, seq: Sequence) -> None:
        """Start a block-less sequence on the longest cached prefix (at least its last token is computed)."""
        assert not self.table_of(seq) and seq.num_computed == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return  # prompt logprobs need the logits of every prompt token: compute them all
        ids: list[int | None] = []
        for i, h in enumerate(self.hashes(seq, (len(seq) - 1) // self.block_size)):
            self.queries += 1
            block_id = self.lookup(seq, i, h)
            if block_id is None:
                break
            self.hits += 1
            ids.append(block_id)
        self.take_prefix(seq, ids)
        seq.num_hashed_blocks = len(ids)
        seq.num_computed = len(ids) * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks to hold ``num_tokens`` more tokens after the computed ones (counting a copy-on-write)."""
        end, table = seq.num_cached + num_tokens, self.table_of(seq)
        need = -(-end // self.block_size) - len(table)
        first = seq.num_cached // self.block_size  # the block the first new token is written into
        if first < len(table) and table[first] >= 0 and self.blocks[table[first]].ref_count > 1:
            need += 1
        return max(need, 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Give ``seq`` slots for ``num_tokens`` more tokens; returns the (src, dst) block copies to make."""
        copies = []
        bs, table = self.block_size, self.table_of(seq)
        for i in range(seq.num_cached // bs, len(table)):  # blocks about to be written
            b = self.blocks[table[i]]
            if b.ref_count > 1:  # copy-on-write
                b.ref_count -= 1
                new = self._new_block()
                copies.append((b.block_id, new))
                table[i] = new
        end = seq.num_cached + num_tokens
        while len(table) * bs < end:
            table.append(self._new_block())
        return copies

    def release_behind(self, seq: Sequence) -> None:
        """Free the blocks no later query of ``seq`` can see through the window (their entries become -1).

        The next query is at position p = num_computed and sees keys j > p − window; one more key is kept, which a
        sibling forked from this sequence needs: it recomputes the last prompt token (position p − 1)."""
        if self.window is None:
            return
        table, first_key = self.table_of(seq), seq.num_computed - self.window
        for i in range(min(max(first_key, 0) // self.block_size, len(table))):
            if table[i] >= 0:
                self._unref(table[i])
                table[i] = -1

    def slide(self, seq: Sequence) -> list[tuple[int, int, int]]:
        """StreamingLLM: drop ``seq``'s oldest blocks after its sinks while the next token still sees at least
        ``kv_window`` keys before it; returns the sink blocks to re-rotate, (source, destination, positions on).

        The sinks are the first ⌈attention_sinks / block_size⌉ blocks. At the first drop they move to new blocks
        (the originals are kept in ``sink_source``); each drop re-rotates them from the originals by the new
        ``kv_shift``. With no free block for that yet, the sinks wait for one (and keep their old rotation)."""
        w = seq.params.kv_window
        if w is None:
            return []
        bs, table = self.block_size, self.table_of(seq)
        n_sink = -(-seq.params.attention_sinks // bs)
        shift = seq.kv_shift
        while seq.num_cached - n_sink * bs - bs >= w and len(table) > n_sink + 1:
            self._unref(table.pop(n_sink))
            seq.kv_shift += bs
        if not n_sink or not seq.kv_shift:
            return []
        if not seq.sink_source:
            if self.num_free < n_sink:
                return []
            seq.sink_source = table[:n_sink]
            table[:n_sink] = [self._new_block() for _ in range(n_sink)]
        elif seq.kv_shift == shift:
            return []
        return [(src, dst, seq.kv_shift) for src, dst in zip(seq.sink_source, table[:n_sink])]

    def fresh_blocks(self, n: int) -> list[int] | None:
        """``n`` new blocks (to compact a sequence's cache into, SnapKV), or None when fewer are free."""
        return [self._new_block() for _ in range(n)] if self.num_free >= n else None

    def replace_table(self, seq: Sequence, table: list[int]) -> None:
        """``seq``'s cache now lives in ``table`` (its compacted copy); the old blocks are released."""
        old = self.table_of(seq)
        setattr(seq, self.table, table)
        for block_id in old:
            if block_id >= 0:
                self._unref(block_id)

    def _unref(self, block_id: int) -> None:
        b = self.blocks[block_id]
        b.ref_count -= 1
        assert b.ref_count >= 0
        if b.ref_count == 0:
            if b.hash is None:
                self.free.appendleft(block_id)  # nothing to reuse: hand it out first
            else:
                self.free.append(block_id)
            self._free_set.add(block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that are now full of computed tokens, so later prompts can reuse them."""
        n_full = min(seq.num_computed // self.block_size, len(self.table_of(seq)))
        self.register(seq, seq.num_hashed_blocks, n_full)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, n_full)

    def register(self, seq: Sequence, lo: int, hi: int) -> None:
        """Register blocks lo … hi−1 of ``seq`` (full of computed tokens) under their chain hashes (none once its
        cache has dropped tokens: its table's blocks no longer hold the token blocks of the same index)."""
        if not self.enable_prefix_caching or hi <= lo or seq.kv_shift:
            return
        bs, table = self.block_size, self.table_of(seq)
        hashes = self.hashes(seq, hi)
        for i in range(lo, hi):
            if table[i] < 0:
                continue
            b = self.blocks[table[i]]
            if b.hash is None:
                b.hash, b.token_ids, b.adapter = hashes[i], tuple(seq.tokens[i * bs:(i + 1) * bs]), seq.adapter
                self.cached.setdefault(hashes[i], b.block_id)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of the parent's blocks with the child (copy-on-write when either writes)."""
        assert not self.table_of(child)
        table = self.table_of(parent)
        for block_id in table:
            if block_id >= 0:
                self.blocks[block_id].ref_count += 1
        setattr(child, self.table, list(table))
        child.num_hashed_blocks = parent.num_hashed_blocks
        for block_id in parent.sink_source:
            self.blocks[block_id].ref_count += 1
        child.kv_shift, child.sink_source = parent.kv_shift, list(parent.sink_source)

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks no one uses go back to the pool (hash kept for reuse)."""
        for block_id in reversed(self.table_of(seq)):
            if block_id >= 0:
                self._unref(block_id)
        for block_id in seq.sink_source:
            self._unref(block_id)
        setattr(seq, self.table, [])
        seq.num_computed = seq.num_hashed_blocks = seq.draft_computed = seq.kv_shift = 0
        seq.sink_source = []

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's tokens (allocated for draft tokens that were rejected)."""
        table = self.table_of(seq)
        keep = -(-(len(seq) - seq.kv_shift) // self.block_size)
        while len(table) > keep:
            block_id = table.pop()
            if block_id >= 0:
                self._unref(block_id)


class BlockGroups:
    """The block managers of one model, one per kind of layer KV (all layers alike: one manager).

    Every call goes to each manager for the same sequence, so their tables advance together; a step's
    copy-on-write copies are tagged with the group whose pool they are in: (group, src, dst).
    """

    def __init__(self, managers: list[BlockManager]) -> None:
        if not managers:
            raise ValueError("BlockGroups needs at least one BlockManager")
        self.managers = managers

    @property
    def num_blocks(self) -> int:
        return self.managers[0].num_blocks

    @property
    def block_size(self) -> int:
        return self.managers[0].block_size

    @property
    def blocks(self) -> list[Block]:
        return [b for m in self.managers for b in m.blocks]

    @property
    def num_free(self) -> int:
        return min(m.num_free for m in self.managers)

    def stats(self) -> BlockStats:
        if len(self.managers) == 1:
            return self.managers[0].stats()
        first, n = self.managers[0], sum(m.num_blocks for m in self.managers)
        free = sum(m.num_free for m in self.managers)
        return BlockStats(n, free, n - free, first.queries, first.hits, first.stats().hit_rate)

    def match_prefix(self, seq: Sequence) -> None:
        """The longest cached prefix every group can start from: all of it in the full-attention groups, the
        blocks the window sees from the prefix's end in the windowed ones (vLLM's hybrid prefix caching)."""
        if len(self.managers) == 1 and self.managers[0].window is None:
            self.managers[0].match_prefix(seq)
            return
        first = self.managers[0]
        if not all(m.enable_prefix_caching for m in self.managers) or seq.params.prompt_logprobs is not None:
            return
        bs = self.block_size
        hashes = first.hashes(seq, (len(seq) - 1) // bs)
        hits = [[m.lookup(seq, i, h) for i, h in enumerate(hashes)] for m in self.managers]
        n = len(hashes)
        for m, found in zip(self.managers, hits):
            if m.window is None:
                n = min(n, next((i for i, b in enumerate(found) if b is None), n))

        def seen_from(m: BlockManager, n: int) -> int:  # the first block the window sees from position n·bs on
            return max(n * bs - m.window, 0) // bs  # type: ignore[operator]

        for m, found in zip(self.managers, hits):
            if m.window is not None:
                while n > 0 and any(b is None for b in found[seen_from(m, n):n]):
                    n -= 1
        first.queries += len(hashes)
        first.hits += n
        for m, found in zip(self.managers, hits):
            lo = seen_from(m, n) if m.window is not None else 0
            m.take_prefix(seq, [None] * lo + found[lo:n])
        seq.num_hashed_blocks = n
        seq.num_computed = n * bs

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return all(m.can_allocate(seq, num_tokens) for m in self.managers)

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int, int]]:
        return [(g, src, dst) for g, m in enumerate(self.managers) for src, dst in m.allocate(seq, num_tokens)]

    def register_full_blocks(self, seq: Sequence) -> None:
        n_full = seq.num_computed // self.block_size
        for m in self.managers:
            m.register(seq, seq.num_hashed_blocks, min(n_full, len(m.table_of(seq))))
            m.release_behind(seq)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, n_full)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for m in self.managers:
            m.fork(parent, child)

    def slide(self, seq: Sequence) -> list[tuple[int, int, int]]:
        if seq.params.kv_window is None:
            return []
        if len(self.managers) > 1 or self.managers[0].window is not None:
            raise ValueError("kv_window (attention sinks) on a model with sliding-window layers")
        return self.managers[0].slide(seq)

    def free_seq(self, seq: Sequence) -> None:
        for m in self.managers:
            m.free_seq(seq)

    def trim(self, seq: Sequence) -> None:
        for m in self.managers:
            m.trim(seq)
