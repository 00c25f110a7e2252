"""Continuous batching (Orca, Yu et al. 2022) with chunked prefill (Sarathi, Agrawal et al. 2023).

Every step the scheduler picks the work for one forward pass under a token budget: first the
running sequences in arrival order (a decode costs one token, an unfinished prefill the next
chunk), then waiting sequences first-come-first-served while budget, sequence slots and KV blocks
last. When the KV pool runs out, the most recently arrived running sequence is preempted by
recompute (vLLM): its blocks are freed and it goes back to the head of the queue, to be prefilled
again (prompt + what it generated so far) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockGroups, BlockManager
from .sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (``max_waiting``)."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence feeds this step
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # copy-on-write block copies: (group, src, dst)
    rotations: list[tuple[int, int, int]] = field(default_factory=list)  # sink blocks to re-rotate: (src, dst, by)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager | BlockGroups, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_waiting: int = 100_000) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("Scheduler: max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager if isinstance(block_manager, BlockGroups) else BlockGroups([block_manager])
        self.max_num_seqs, self.max_num_batched_tokens, self.max_waiting = max_num_seqs, max_num_batched_tokens, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seqs: list[Sequence]) -> None:
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} sequences)")
        self.waiting.extend(seqs)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release_waiting_blocks(self) -> bool:
        """Free blocks held by waiting (forked) sequences; True if any were."""
        held = [s for s in self.waiting if s.block_table]
        for s in held:
            self.bm.free_seq(s)
        return bool(held)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            slid = self.bm.slide(seq)
            while not self.bm.can_allocate(seq, n):
                if self.running[-1] is seq and self._release_waiting_blocks():
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:
                break
            batch.copies += self.bm.allocate(seq, n)
            batch.rotations += slid  # only for a sequence in the step (a preempted one's blocks are already freed)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            i += 1
        if batch.num_preempted:
            return batch
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.parent is not None:  # a sibling waits for its parent's prefill, then shares its blocks
                continue
            if not seq.block_table:
                self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.bm.can_allocate(seq, n):
                self.bm.free_seq(seq)  # don't hold cached blocks while waiting
                break
            self.waiting.remove(seq)
            batch.copies += self.bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def computed(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens went through the model (their K/V are now cached)."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            self.bm.register_full_blocks(seq)
            if seq.children and seq.num_computed >= seq.prompt_len:
                for child in seq.children:
                    if child.parent is seq and child.status is SequenceStatus.WAITING and not child.block_table:
                        self.bm.fork(seq, child)
                        child.num_computed = seq.prompt_len - 1  # recompute the last prompt token: its logits
                    child.parent = None
                seq.children = []

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for child in seq.children:  # an unstarted sibling no longer waits for this one
            child.parent = None
        seq.children = []
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
