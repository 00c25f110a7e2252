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

from ..nn.moe import moe_rows_by
from ..quant.native import GGUFBlockLinear
from ..quant.row_kernel import SHORT_PROMPT, RowKind, rows_are
from .lora import StepAdapters
from .native_decode import NativeDecoder, why_not
from .kv_eviction import OBSERVATION, snapkv_keep
from .kv_format import KVFormat, hadamard64, kv_format
from .kv_tail import KVTail
from .paged_attention import AttentionMetadata, PagedKVCache, PrefillChunk, native_kernel
from .scheduler import ScheduledBatch
from .sequence import Sequence


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


def row_kind(seq: Sequence, n: int) -> RowKind:
    """What ``seq``'s ``n`` rows of this step are: generated tokens, or rows of a short or a long prompt (by the
    length of the request's whole prompt, so every chunk of a prompt is of one kind)."""
    if is_generated(seq, n):
        return "generated"
    return "short-prompt" if seq.prompt_len <= SHORT_PROMPT else "prompt"


def is_generated(seq: Sequence, n: int) -> bool:
    """``seq``'s ``n`` rows of this step are generated tokens (the decode path): its newest token past the prompt,
    followed by its draft tokens if it verifies some (speculative decoding)."""
    return n == 1 + len(seq.spec_tokens) and seq.num_computed >= seq.prompt_len


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, compile: bool = False,
                 kv_dtype: torch.dtype | KVFormat | str | None = None, batch_invariant: bool = True,
                 free_window_kv: bool = True, pools: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tail_slots: int = 0) -> None:
        """``kv_dtype``: how the pool stores K/V (a float dtype, or a :mod:`~attnkit.engine.kv_format` name such as
        "q8_0"); None: the parameters' dtype. ``pools``: K and V pools to use instead of new ones (a layer-skipping
        draft reads its target's). ``tail_slots``: a quantized cache's exact blocks (attnkit.engine.kv_tail), as many
        at once (only where :meth:`exact_blocks_apply`)."""
        cfg = model.cfg
        if not hasattr(cfg, "n_kv_heads") or not hasattr(cfg, "hd"):
            raise TypeError(f"the engine runs decoder-only models (Llama family, GPT-2); got {type(model).__name__}")
        self.model = model.eval()
        self.block_size = block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        n_layers = len(model.layers)
        # each layer's sliding window (None: it sees every earlier key)
        self.windows: list[int | None] = [getattr(layer.self_attn, "window", None) for layer in model.layers]
        # the KV groups: layers alike share a block table (BlockGroups); with free_window_kv every distinct window
        # is a group whose blocks behind the window are freed; else one table for all (prefix caching kept)
        kinds = sorted(set(self.windows), key=lambda w: -1 if w is None else w) if free_window_kv else [None]
        self.group_windows: list[int | None] = kinds
        self.group_of: list[int] = [kinds.index(w) if free_window_kv else 0 for w in self.windows]
        self.group_tables = ["block_table", "window_table"][:len(kinds)] if len(kinds) <= 2 else None
        if self.group_tables is None:
            raise ValueError(f"layers with more than two kinds of attention window ({kinds}): set free_window_kv=False")
        # one attention metadata per (KV group, window) of the layers, built each step
        self.meta_keys = sorted({(g, w) for g, w in zip(self.group_of, self.windows)}, key=str)
        # the pool's row format: K/V are converted (or quantized) on writing and read back widened
        self.kv_format = fmt = kv_format(kv_dtype or self.dtype)
        shape = (n_layers, cfg.n_kv_heads, num_blocks, block_size, fmt.row_width(cfg.hd))  # head-major, see PagedKVCache
        if pools is not None:
            if tuple(pools[0].shape) != shape or tuple(pools[1].shape) != shape:
                raise ValueError(f"ModelRunner: the given K/V pools are {tuple(pools[0].shape)}, the model needs {shape}")
            self.k_pool, self.v_pool = pools
        else:
            self.k_pool, self.v_pool = (lazy_zeros(shape, fmt.storage, self.device),
                                        lazy_zeros(shape, fmt.storage, self.device))
        # prompt rows attend one by one through the C paged attention, each exactly as a decode step at its
        # position would (float32 activations over a float32/float16 pool on the CPU; see _run)
        self.row_attention = batch_invariant and not compile and native_kernel(
            torch.empty(0, dtype=self.dtype, device=self.device), self.k_pool, fmt) is not None
        self.tail: KVTail | None = None
        if tail_slots:
            if not self.exact_blocks_apply(model, fmt):
                raise ValueError(f"exact blocks need a quantized K/V cache (got {fmt.name}), one kind of attention window "
                                 "and no soft-capped layers")
            tshape = KVTail.shape(n_layers, cfg.n_kv_heads, tail_slots, block_size, cfg.hd)
            self.tail = KVTail(lazy_zeros(tshape, torch.uint8, self.device), lazy_zeros(tshape, torch.uint8, self.device))
        self._filled: list[int] = []  # blocks the step writes to their end (KVTail.filled)
        self.caches = [PagedKVCache(self.k_pool[i], self.v_pool[i], getattr(layer.self_attn, "scale", None),
                                    getattr(layer.self_attn, "softcap", None), fmt, self.tail, i)
                       for i, layer in enumerate(model.layers)]
        # compile: the decode attention reads K/V through the block tables inside one compiled kernel
        # (inductor) instead of copying every sequence's blocks out of the pool first
        self.compile = compile
        self.lora_step: StepAdapters | None = None  # set once LoRA adapters are loaded (attnkit.engine.lora)
        self.prompt_logits: tuple[list[tuple[int, int, int]], torch.Tensor] = ([], torch.empty(0))
        # SnapKV: the queries of each kv_budget sequence's observation window in the last step, per layer, and their
        # cache indices (seq_id → ([(nh, m, hd) per layer], (m,))), for compact()
        self.observed: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # decode-only steps run all layers in one C call when the model allows it
        # (attnkit.engine.native_decode); built at the first step; False: eager only
        self.native: NativeDecoder | bool | None = None
        self.native_reason: str | None = None  # why not, when native is False
        self.batch_invariant = batch_invariant

    @staticmethod
    def exact_blocks_apply(model: nn.Module, fmt: KVFormat) -> bool:
        """Whether a pool of ``fmt`` can keep exact blocks for ``model`` (attnkit.engine.kv_tail): quantized rows, one
        kind of attention window (so one block table and one metadata a step), no soft-capped scores."""
        attns = [layer.self_attn for layer in model.layers]
        return fmt.quantized and len({getattr(a, "window", None) for a in attns}) == 1 \
            and all(getattr(a, "softcap", None) is None for a in attns)

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype | KVFormat | str | None = None) -> int:
        """The K and V bytes of one block over all layers; ``kv_dtype`` None: the model's parameters' dtype."""
        cfg = model.cfg
        row = kv_format(kv_dtype or next(model.parameters()).dtype).row_bytes(cfg.hd)
        return 2 * len(model.layers) * block_size * cfg.n_kv_heads * row

    def kv_groups(self) -> list[tuple[str, int | None]]:
        """(the Sequence attribute holding the group's block table, the window whose keys it frees) per KV group."""
        return [(t, w) for t, w in zip(self.group_tables, self.group_windows)]  # type: ignore[arg-type]

    def _mask(self, q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
        """(n, k_len): key j visible to the query at absolute position p iff j <= p (and p - j < window)."""
        j = torch.arange(k_len, device=self.device)[None, :]
        m = j <= q_pos[:, None]
        if window is not None:
            m &= q_pos[:, None] - j < window
        return m

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Forward the batch; returns (logits (S, vocab) float32, indices into batch.seqs of the S sampling rows).

        Sequences that want prompt logprobs also get the logits of their prompt rows in this step, left in
        ``prompt_logits``: ([(row in batch, first position, count)], (P, vocab)).

        Batch invariance: a row's numbers depend on what the row is, never on what shares the step. A
        generated token (one new token past its prompt) always takes the decode path — the C step where the
        model allows it, else the eager model with GGUF layers on their integer kernel — and prompt rows
        always the prompt path (GGUF layers' dense products; the integer kernel for the rows of a short prompt,
        :data:`~attnkit.quant.row_kernel.SHORT_PROMPT`). A step holding several kinds runs one pass per kind.

        Speculative decoding: a sequence with ``spec_tokens`` feeds its newest token and those drafts, each row a
        generated token's decode row, and gets logits for every one of them (1 + len(spec_tokens) rows, in order).
        """
        self.copy_blocks(batch.copies)
        self.rotate_sinks(batch.rotations)
        try:
            return self._run_kinds(batch)
        finally:
            if self.tail is not None:
                self.tail.filled(self._filled)
            self._filled = []

    def _run_kinds(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """:meth:`run` past the step's block copies: one pass, or one per kind of row (batch invariance)."""
        if not self.batch_invariant:
            return self._run(batch)
        kinds = [row_kind(s, n) for s, n in zip(batch.seqs, batch.num_tokens)]
        if "short-prompt" in kinds and "prompt" in kinds and self._prompt_kinds_alike():
            kinds = ["prompt" if k == "short-prompt" else k for k in kinds]  # one pass: every layer's product the same
        if len(set(kinds)) == 1:
            with rows_are(kinds[0]):
                return self._run(batch, kinds[0] == "generated")
        logits, rows, prompt_rows, prompt_logits = [], [], [], []
        for kind in ("generated", "short-prompt", "prompt"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
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

    def _prompt_kinds_alike(self) -> bool:
        """Whether short and long prompts' rows take the same product in every layer that chooses by the kind (the
        model's GGUF blocks; asked at each mixed step, since a caller may change a layer's choice between steps)."""
        return all(m.prompt_kinds_alike() for m in self.model.modules() if isinstance(m, GGUFBlockLinear))

    def _observe(self, rows: list[tuple[Sequence, int, int, int]], meta: AttentionMetadata) -> None:
        """Have every layer keep the queries of the last rows of each kv_budget sequence's prompt chunk (SnapKV)."""
        for seq, t0, pos0, n in rows:
            if seq.params.kv_budget is None or is_generated(seq, n):
                continue
            m = min(OBSERVATION, n)
            queries: list[torch.Tensor] = []
            meta.observe.append((torch.arange(t0 + n - m, t0 + n, device=self.device), queries))
            end = pos0 - seq.kv_shift + n
            self.observed[seq.seq_id] = (queries, torch.arange(end - m, end, device=self.device))

    def compact(self, seq: Sequence, old: list[int], new: list[int], n_cached: int, budget: int) -> None:
        """SnapKV: copy the ``budget`` rows each layer and KV head keeps of ``seq``'s ``n_cached`` (in blocks ``old``)
        into blocks ``new``, in order (attnkit.engine.kv_eviction.snapkv_keep picks them from the observed queries).

        A kept key moves from cache index j to i ≤ j while the sequence's shift grows by n_cached − budget; its key is
        re-rotated by the difference, i − j + n_cached − budget positions, so that every key's distance to a query is
        its distance in the cache, as the sinks' are (StreamingLLM's positions within the cache: a stream read past
        the model's context never shows it a distance it was not trained on). The recent keys do not move."""
        queries, q_index = self.observed.pop(seq.seq_id)
        bs, fmt = self.block_size, self.kv_format
        i = torch.arange(n_cached, device=self.device)
        src = torch.tensor(old, device=self.device)[i // bs] * bs + i % bs  # (n_cached,) slots in cache order
        j = torch.arange(budget, device=self.device)
        dst = torch.tensor(new, device=self.device)[j // bs] * bs + j % bs
        n_kv, width = self.k_pool.shape[1], self.k_pool.shape[-1]
        for layer, cache in enumerate(self.caches):
            kf, vf = self.k_pool[layer].view(n_kv, -1, width), self.v_pool[layer].view(n_kv, -1, width)
            keep = snapkv_keep(queries[layer], fmt.dequantize(kf[:, src], torch.float32), q_index, cache.scale, budget)
            rows = src[keep][..., None].expand(-1, -1, width)  # (n_kv, budget, width)
            kf[:, dst] = self._rope_rows(kf.gather(1, rows), j - keep + n_cached - budget)
            vf[:, dst] = vf.gather(1, rows)

    def rotate_sinks(self, moves: list[tuple[int, int, int]]) -> None:
        """StreamingLLM's sinks (BlockManager.slide): block dst ← block src, its keys rotated ``by`` positions on;
        values copied as they are."""
        for src, dst, by in moves:
            k = self.k_pool[:, :, src]  # (L, n_kv, bs, width)
            self.k_pool[:, :, dst] = self._rope_rows(k, torch.full(k.shape[:-1], by, device=self.device))
            self.v_pool[:, :, dst] = self.v_pool[:, :, src]

    def _rope_rows(self, rows: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """Pool rows of keys (…, width) rotated ``by`` (…) positions on (RoPE composes: R(p + b) = R(b)·R(p)):
        dequantized, out of the Hadamard basis, rotated, back in and requantized as the pool stores them. Rows not
        moved (by 0) come back as they were."""
        rot, fmt = self.model.rotary, self.kv_format
        cos, sin = rot.cos_sin(by.reshape(-1))  # (n, rd)
        shape = (*by.shape, cos.shape[-1])
        cos, sin = (cos / rot.attention_factor).view(shape), (sin / rot.attention_factor).view(shape)  # a pure rotation
        k = fmt.dequantize(rows, torch.float32)
        if fmt.rotates(k.shape[-1]):  # stored Hadamard-rotated: RoPE acts on the plain rows
            k = hadamard64(rot.rotate(hadamard64(k), cos, sin))
        else:
            k = rot.rotate(k, cos, sin)
        out = fmt.quantize(k)
        still = (by == 0)[..., None].expand_as(rows)
        return torch.where(still, rows, out)

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """The copy-on-write copies (group, src, dst) of a step, made in every layer of the group."""
        for g in {g for g, _, _ in copies}:
            src = torch.tensor([s for gg, s, _ in copies if gg == g], device=self.device)
            dst = torch.tensor([d for gg, _, d in copies if gg == g], device=self.device)
            for layer in (i for i, lg in enumerate(self.group_of) if lg == g):
                self.k_pool[layer, :, dst] = self.k_pool[layer, :, src]
                self.v_pool[layer, :, dst] = self.v_pool[layer, :, src]
        if self.tail is not None:
            for _, src, dst in copies:
                self.tail.copy(src, dst)

    def _run(self, batch: ScheduledBatch, generated: bool = True) -> tuple[torch.Tensor, list[int]]:
        """One forward pass over the batch (its copy-on-write copies already made); ``generated``: its rows are
        all generated tokens (the decode path), else prompt rows.

        With batch invariance every prompt row attends on its own, as a decode query over its keys in the pool
        (the chunk's K/V are written first): a row's attention is then the same whatever chunk it came in."""
        per_row = not generated and self.row_attention
        ids: list[int] = []
        pos: list[int] = []
        rows: list[tuple[Sequence, int, int, int]] = []  # (sequence, offset in the packed row, first position, count)
        sample_rows: list[int] = []
        logits_idx: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (row in batch, first position, count) wanting prompt logprobs
        prompt_idx: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, t0 = seq.num_computed, len(ids)
            spec = seq.spec_tokens
            ids += (seq.tokens[start:start + n] + spec)[:n] if spec else seq.tokens[start:start + n]
            pos += range(start, start + n)
            rows.append((seq, t0, start, n))
            ctx = start + n
            if spec:  # verifying drafts: the logits of every row
                sample_rows.append(row)
                logits_idx += range(t0, t0 + n)
            elif ctx == len(seq):
                sample_rows.append(row)
                logits_idx.append(len(ids) - 1)
            if seq.params.prompt_logprobs is not None and start < seq.prompt_len - 1:
                # the rows at positions start … predict prompt tokens start+1 … (the sampling row excluded)
                upto = min(ctx, seq.prompt_len - 1)
                prompt_rows.append((row, start, upto - start))
                prompt_idx += range(t0, t0 + upto - start)
        # one metadata per (KV group, window) of the layers: the group's block tables, the window's visibility
        keys = self.meta_keys
        metas = {key: self._metadata(rows, self.group_tables[key[0]], key[1], per_row, generated)  # type: ignore[index]
                 for key in keys}
        meta = metas[keys[0]]
        model = self.model
        c_step = not self.compile
        if c_step and self.native is None:  # built at the first step of any kind: prompt rows use its MoE too
            self.native_reason = why_not(model, self.k_pool, self.kv_format)
            layer_views = [keys.index((g, w)) for g, w in zip(self.group_of, self.windows)]  # each layer's metadata
            self.native = NativeDecoder(model, self.k_pool, self.v_pool, self.kv_format, self.tail, layer_views) \
                if self.native_reason is None else False
        if meta.decode_only and generated and c_step:
            if self.native and (self.batch_invariant or len(ids) <= self.native.max_rows):
                views = [(m.slots, m.decode_tables, m.decode_lens, m.decode_starts) for m in (metas[k] for k in keys)]
                assert all(t is not None for view in views for t in view)
                adapters = None  # each row's LoRA adapter (a verifying sequence's rows all its own)
                if self.lora_step is not None and any(s.adapter for s in batch.seqs):
                    adapters = torch.tensor([s.adapter for s, n in zip(batch.seqs, batch.num_tokens) for _ in range(n)])
                h = self.native.hidden(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                                       *views[0], meta.decode_tail, others=tuple(views[1:]),  # type: ignore[arg-type]
                                       adapters=adapters)
                self.prompt_logits = ([], torch.empty(0))
                return self.native.logits(h).float(), sample_rows
        for key, m in metas.items():
            if m.decode_tables is not None:  # the additive mask of the bmm / compiled decode attention
                n_keys = m.decode_tables.shape[1] * self.block_size
                lens = m.decode_lens
                visible = self._mask(lens - 1, n_keys, key[1]) & (torch.arange(n_keys, device=self.device)[None, :] < lens[:, None])
                m.decode_bias = torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, float("-inf"))
            m.fused_gather = self.compile and m.decode_only
        self._observe(rows, meta)
        for c, key in zip(self.caches, zip(self.group_of, self.windows)):
            c.meta = metas[key]
        if self.lora_step is not None:
            self.lora_step.set([s.adapter for s in batch.seqs], batch.num_tokens, self.device)
        # a prompt's mixture-of-experts layers by the C step's function (one parallel call a layer), as its decode
        moe_by = self.native.moe_rows if self.native and c_step and not generated else None
        try:
            with moe_rows_by(moe_by):
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

    def _metadata(self, rows: list[tuple[Sequence, int, int, int]], table_attr: str, window: int | None,
                  per_row: bool, generated: bool) -> AttentionMetadata:
        """The attention metadata of the step's packed rows for the layers whose blocks are in ``table_attr``
        (entries -1, freed behind a window, are never read: they point at block 0) and see ``window`` keys.
        Slots, lengths and masks are in cache indices, the rows' positions less the tokens their sequence dropped."""
        bs = self.block_size
        slots: list[int] = []
        dec_idx: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        tail = self.tail
        tail_rows: list[int] = []  # each new token's tail slot
        dec_tail: tuple[list[int], list[int]] = ([], [])  # each decode query's (tail slot, first key read from it)
        for seq, t0, pos0, n in rows:
            table = [max(b, 0) for b in getattr(seq, table_attr)]
            start = pos0 - seq.kv_shift  # the first new token's cache index (StreamingLLM drops tokens)
            slots += [table[i // bs] * bs + i % bs for i in range(start, start + n)]
            ctx = start + n
            exact = tail is not None and seq.params.kv_window is None and seq.params.kv_budget is None \
                and not seq.kv_shift
            if tail is not None:
                for b in range(start // bs, (ctx - 1) // bs + 1):  # each block written: its slot, for its rows
                    first, end = max(start, b * bs), min(ctx, (b + 1) * bs)
                    tail_rows += [tail.slot(table[b], first % bs) if exact else -1] * (end - first)
                if exact:
                    self._filled += [table[b] for b in range(start // bs, ctx // bs)]
            if n == 1 or per_row or seq.spec_tokens:  # a verification's rows: each a decode query
                for i, q_pos in enumerate(range(start, ctx)):
                    dec_idx.append(t0 + i)
                    dec_tables.append(table[:q_pos // bs + 1])
                    dec_lens.append(q_pos + 1)
                    if tail is not None:
                        slot, first = tail.exact(table[q_pos // bs]) if exact else (-1, 0)
                        dec_tail[0].append(slot)
                        dec_tail[1].append(q_pos // bs * bs + first)
            else:
                causal = start == 0 and (window is None or window >= n)  # the mask would be plain causal
                mask = None if causal else self._mask(torch.arange(start, ctx, device=self.device), ctx, window)
                chunk_tail = None  # exact blocks: the tail slot of the block the chunk starts in, its first key held
                if exact and (held := tail.exact(table[start // bs]))[0] >= 0:  # type: ignore[union-attr]
                    chunk_tail = (held[0], start // bs * bs + held[1])
                prefills.append(PrefillChunk(t0, t0 + n, ctx, torch.tensor(table[:-(-ctx // bs)], device=self.device),
                                             mask, chunk_tail))
        meta = AttentionMetadata(torch.tensor(slots, device=self.device), prefills=prefills)
        if tail is not None:
            meta.tail_write = (torch.tensor(tail_rows, device=self.device), meta.slots % bs)  # (slot, offset) a token
            meta.decode_tail = (torch.tensor(dec_tail[0], device=self.device), torch.tensor(dec_tail[1], device=self.device))
        if dec_idx:
            width = max(len(t) for t in dec_tables)
            meta.decode_index = torch.tensor(dec_idx, device=self.device)
            meta.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], device=self.device)
            lens = torch.tensor(dec_lens, device=self.device)
            meta.decode_lens = lens
            meta.decode_starts = (lens - window).clamp_(min=0) if window is not None else torch.zeros_like(lens)
        meta.decode_only = not prefills
        return meta
