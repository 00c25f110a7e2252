"""The model runner: turns a scheduled batch into ONE forward pass and returns next-token logits.

It owns the KV block pool (per layer, (num_blocks, block_size, n_kv_heads, head_dim) for K and V),
lays the step's tokens out packed, builds the attention metadata (slots, block tables, masks) once
for all layers, performs the copy-on-write block copies, and asks the model only for the logits of
sequences whose input is complete (a prefill chunk in the middle of a prompt samples nothing).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..quant.row_kernel import rows_are
from .lora import StepAdapters
from .native_decode import NativeDecoder, why_not
from .paged_attention import AttentionMetadata, PagedKVCache, PrefillChunk, native_kernel
from .scheduler import ScheduledBatch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor whose memory the OS provides only when first written (on the CPU).

    ``torch.zeros`` writes every byte, so a 1 GiB KV pool would be resident from the start. An
    anonymous mapping is zero pages until written; huge pages are turned off for it (MADV_NOHUGEPAGE),
    else the first write into each 2 MiB region would make all of it resident: the pool's resident
    size then grows with the blocks in use, 4 KiB at a time.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import mmap

    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    with warnings.catch_warnings():  # torch notes that a writable mmap buffer is not copied: that is the point
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    return raw[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, compile: bool = False,
                 kv_dtype: torch.dtype | None = None, batch_invariant: bool = True) -> None:
        cfg = model.cfg
        if not hasattr(cfg, "n_kv_heads") or not hasattr(cfg, "hd"):
            raise TypeError(f"the engine runs decoder-only models (Llama family, GPT-2); got {type(model).__name__}")
        self.model = model.eval()
        self.block_size = block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.window: int | None = getattr(cfg, "sliding_window", None)
        shape = (len(model.layers), cfg.n_kv_heads, num_blocks, block_size, cfg.hd)  # head-major, see PagedKVCache
        kv_dtype = kv_dtype or self.dtype  # the pool's; K/V are converted on writing and read back widened
        self.k_pool, self.v_pool = lazy_zeros(shape, kv_dtype, self.device), lazy_zeros(shape, kv_dtype, self.device)
        self.caches = [PagedKVCache(self.k_pool[i], self.v_pool[i]) for i in range(shape[0])]
        # compile: the decode attention reads K/V through the block tables inside one compiled kernel
        # (inductor) instead of copying every sequence's blocks out of the pool first
        self.compile = compile
        self.lora_step: StepAdapters | None = None  # set once LoRA adapters are loaded (attnkit.engine.lora)
        self.prompt_logits: tuple[list[tuple[int, int, int]], torch.Tensor] = ([], torch.empty(0))
        # decode-only steps run all layers in one C call when the model allows it
        # (attnkit.engine.native_decode); built at the first such step; False: eager only
        self.native: NativeDecoder | bool | None = None
        self.native_reason: str | None = None  # why not, when native is False
        self.batch_invariant = batch_invariant
        # prompt rows attend one by one through the C paged attention, each exactly as a decode step at its
        # position would (float32 activations over a float32/float16 pool on the CPU; see _run)
        self.row_attention = batch_invariant and not compile and native_kernel(
            torch.empty(0, dtype=self.dtype, device=self.device), self.k_pool) is not None

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
        """The K and V bytes of one block over all layers; ``kv_dtype`` None: the model's parameters' dtype."""
        cfg = model.cfg
        elt = (kv_dtype or next(model.parameters()).dtype).itemsize
        return 2 * len(model.layers) * block_size * cfg.n_kv_heads * cfg.hd * elt

    def _mask(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """(n, k_len): key j visible to the query at absolute position p iff j <= p (and p - j < window)."""
        j = torch.arange(k_len, device=self.device)[None, :]
        m = j <= q_pos[:, None]
        if self.window is not None:
            m &= q_pos[:, None] - j < self.window
        return m

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Forward the batch; returns (logits (S, vocab) float32, indices into batch.seqs of the S sampling rows).

        Sequences that want prompt logprobs also get the logits of their prompt rows in this step, left in
        ``prompt_logits``: ([(row in batch, first position, count)], (P, vocab)).

        Batch invariance: a row's numbers depend on what the row is, never on what shares the step. A
        generated token (one new token past its prompt) always takes the decode path — the C step where the
        model allows it, else the eager model with GGUF layers on their integer kernel — and prompt rows
        always the prompt path (GGUF layers' dense products). A step holding both runs them as two passes.
        """
        if batch.copies:
            src = torch.tensor([s for s, _ in batch.copies], device=self.device)
            dst = torch.tensor([d for _, d in batch.copies], device=self.device)
            self.k_pool[:, :, dst] = self.k_pool[:, :, src]
            self.v_pool[:, :, dst] = self.v_pool[:, :, src]
        if not self.batch_invariant:
            return self._run(batch)
        generated = [n == 1 and s.num_computed >= s.prompt_len for s, n in zip(batch.seqs, batch.num_tokens)]
        if all(generated) or not any(generated):
            with rows_are("generated" if generated[0] else "prompt"):
                return self._run(batch, generated[0])
        parts = [[i for i, g in enumerate(generated) if g], [i for i, g in enumerate(generated) if not g]]
        logits, rows, prompt_rows, prompt_logits = [], [], [], []
        for kind, idx in zip(("generated", "prompt"), parts):
            sub = ScheduledBatch([batch.seqs[i] for i in idx], [batch.num_tokens[i] for i in idx])
            with rows_are(kind):
                lg, rs = self._run(sub, kind == "generated")
            logits.append(lg)
            rows += [idx[r] for r in rs]
            if self.prompt_logits[0]:
                prompt_rows += [(idx[r], first, count) for r, first, count in self.prompt_logits[0]]
                prompt_logits.append(self.prompt_logits[1])
        self.prompt_logits = (prompt_rows, torch.cat(prompt_logits) if prompt_rows else torch.empty(0))
        return torch.cat(logits), rows

    def _run(self, batch: ScheduledBatch, generated: bool = True) -> tuple[torch.Tensor, list[int]]:
        """One forward pass over the batch (its copy-on-write copies already made); ``generated``: its rows are
        all generated tokens (the decode path), else prompt rows.

        With batch invariance every prompt row attends on its own, as a decode query over its keys in the pool
        (the chunk's K/V are written first): a row's attention is then the same whatever chunk it came in."""
        bs = self.block_size
        per_row = not generated and self.row_attention
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_idx: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        logits_idx: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (row in batch, first position, count) wanting prompt logprobs
        prompt_idx: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, t0 = seq.num_computed, len(ids)
            p = list(range(start, start + n))
            ids += seq.tokens[start:start + n]
            pos += p
            table = seq.block_table
            slots += [table[i // bs] * bs + i % bs for i in p]
            ctx = start + n
            n_blocks = -(-ctx // bs)
            if n == 1 or per_row:
                for i, q_pos in enumerate(p):
                    dec_idx.append(t0 + i)
                    dec_tables.append(table[:q_pos // bs + 1])
                    dec_lens.append(q_pos + 1)
            else:
                causal = start == 0 and (self.window is None or self.window >= n)  # the mask would be plain causal
                mask = None if causal else self._mask(torch.arange(start, ctx, device=self.device), ctx)
                prefills.append(PrefillChunk(t0, t0 + n, ctx, torch.tensor(table[:n_blocks], device=self.device), mask))
            if ctx == len(seq):
                sample_rows.append(row)
                logits_idx.append(len(ids) - 1)
            if seq.params.prompt_logprobs is not None and start < seq.prompt_len - 1:
                # the rows at positions start … predict prompt tokens start+1 … (the sampling row excluded)
                upto = min(ctx, seq.prompt_len - 1)
                prompt_rows.append((row, start, upto - start))
                prompt_idx += range(t0, t0 + upto - start)
        meta = AttentionMetadata(torch.tensor(slots, device=self.device), prefills=prefills)
        if dec_idx:
            width = max(len(t) for t in dec_tables)
            meta.decode_index = torch.tensor(dec_idx, device=self.device)
            meta.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], device=self.device)
            lens = torch.tensor(dec_lens, device=self.device)
            meta.decode_lens = lens
            meta.decode_starts = (lens - self.window).clamp_(min=0) if self.window is not None else torch.zeros_like(lens)
        model = self.model
        meta.decode_only = not prefills
        if meta.decode_only and generated and not self.compile and self.lora_step is None:
            if self.native is None:
                self.native_reason = why_not(model, self.k_pool)
                self.native = NativeDecoder(model, self.k_pool, self.v_pool) if self.native_reason is None else False
            if self.native and (self.batch_invariant or len(ids) <= self.native.max_rows):
                assert meta.decode_tables is not None and meta.decode_lens is not None and meta.decode_starts is not None
                h = self.native.hidden(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                                       meta.slots, meta.decode_tables, meta.decode_lens, meta.decode_starts)
                self.prompt_logits = ([], torch.empty(0))
                return self.native.logits(h).float(), sample_rows
        if dec_idx:  # the additive mask of the bmm / compiled decode attention (the C kernels take lens and starts)
            n_keys = meta.decode_tables.shape[1] * bs
            visible = self._mask(lens - 1, n_keys) & (torch.arange(n_keys, device=self.device)[None, :] < lens[:, None])
            meta.decode_bias = torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, float("-inf"))
        meta.fused_gather = self.compile and meta.decode_only
        for c in self.caches:
            c.meta = meta
        if self.lora_step is not None:
            self.lora_step.set([s.adapter for s in batch.seqs], batch.num_tokens, self.device)
        try:
            logits = model(torch.tensor([ids], device=self.device), cache=self.caches,
                                positions=torch.tensor(pos, device=self.device),
                                logits_indices=torch.tensor(logits_idx + prompt_idx, device=self.device, dtype=torch.long))
        finally:
            for c in self.caches:
                c.meta = None
            if self.lora_step is not None:
                self.lora_step.clear()
        logits = logits[0].float()
        self.prompt_logits = (prompt_rows, logits[len(logits_idx):])  # for the engine's prompt logprobs
        return logits[:len(logits_idx)], sample_rows
