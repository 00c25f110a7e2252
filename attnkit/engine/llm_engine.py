"""LLMEngine: the step loop joining scheduler, model runner and sampler (vLLM's ``LLMEngine``).

``add_request`` validates and queues; every ``step`` schedules one batch, runs ONE forward for it,
samples one token for each sequence whose input is complete, detokenises incrementally, checks the
stop conditions (EOS, stop token ids, stop strings matched across token boundaries and cut from the
text, max_tokens, the context length), frees finished sequences' blocks, and returns the outputs of
the requests that progressed. ``abort_request`` frees a request's blocks at once. ``add_lora`` loads
a LoRA adapter that requests then name (``add_request(..., lora=name)``); requests for different
adapters and for the base share every step (:mod:`attnkit.engine.lora`).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .options import KV_CACHE_DTYPES
from .kv_format import KVFormat, kv_format
from .kv_tail import KVTail
from ..text.detokenize import IncrementalDetokenizer
from ..kernels.allocator import tune_malloc
from .block_manager import BlockGroups, BlockManager, BlockStats
from .grammar import Grammars
from .lora import LoraAdapters
from .model_runner import ModelRunner, is_generated
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampler import plain_greedy, sample
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .speculative import SpecController, SpeculativeConfig

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    block_size: int | None = None  # tokens per KV block; None: 16, or 32 with exact blocks (kv_exact_blocks)
    num_blocks: int | None = None  # default: kv_cache_bytes worth of blocks
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's context, capped by the pool
    max_waiting: int = 100_000
    enable_prefix_caching: bool = True
    compile: bool = False  # decode attention as one compiled kernel over the block tables (see ModelRunner)
    # the K/V pool's dtype or quantized format (q8_0/int8, q4_0/int4: attnkit.engine.kv_format); "auto": the model's
    # parameters' dtype (vLLM's kv_cache_dtype)
    kv_cache_dtype: str = "auto"
    # a quantized cache reads each query's own block from q8_0 rows kept aside (attnkit.engine.kv_tail); None: on for q4_0
    kv_exact_blocks: bool | None = None
    # a request's numbers independent of what shares its steps (see ModelRunner.run); False: each step's
    # products chosen by its row count, as before (vLLM's VLLM_BATCH_INVARIANT, off there by default)
    batch_invariant: bool = True
    # sliding-window layers free the KV blocks the window has passed (their own block tables: BlockGroups);
    # False keeps every block in one table, as full-attention layers do, so that prefix caching applies
    free_window_kv: bool = True
    # speculative decoding (attnkit.engine.speculative): "ngram" | "draft:PATH" | "layerskip:N" or a SpeculativeConfig
    speculative: str | SpeculativeConfig | None = None
    num_speculative_tokens: int | None = None  # the most draft tokens per step (default 5)

    def kv_dtype(self, model: nn.Module) -> KVFormat:
        """The K/V pool's row format for ``model``: ``kv_cache_dtype``, "auto" resolved to the parameters' dtype."""
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "auto":
            return kv_format(next(model.parameters()).dtype)
        fmt = kv_format(self.kv_cache_dtype)
        fmt.row_width(model.cfg.hd)  # a quantized format needs whole blocks per row: a clear error here
        return fmt


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    detoks: list[IncrementalDetokenizer | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 eos_ids: set[int] | None = None, draft_model: nn.Module | None = None) -> None:
        """``draft_model``: the speculative draft when ``config.speculative`` is "draft" (else loaded from its path)."""
        cfg = config or EngineConfig()
        kv_dtype = cfg.kv_dtype(model)
        exact = cfg.kv_exact_blocks if cfg.kv_exact_blocks is not None else kv_dtype.name == "q4_0"
        if exact and not ModelRunner.exact_blocks_apply(model, kv_dtype):
            if cfg.kv_exact_blocks:  # asked for by name: say why not
                raise ValueError(f"kv_exact_blocks: exact blocks need a quantized K/V cache (got {kv_dtype.name}), one "
                                 "kind of attention window and no soft-capped layers")
            exact = False
        if cfg.block_size is None:  # exact 32-token blocks: KL 0.0240 against 0.0355 at 16 (benchmarks/kv_quant_ablation.py)
            cfg = dataclasses.replace(cfg, block_size=32 if exact else 16)
        self.config = cfg
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.cfg.vocab_size
        self.eos_ids = set(eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer is not None else ()))
        spec = SpeculativeConfig.parse(cfg.speculative, cfg.num_speculative_tokens)
        if spec is not None and spec.method == "draft" and draft_model is None:
            if spec.draft_model is None:
                raise ValueError("speculative method 'draft' needs a draft model (draft:PATH or draft_model=)")
            from ..loading import load_causal_lm

            draft_model = load_causal_lm(spec.draft_model).model
        block_bytes = ModelRunner.bytes_per_block(model, cfg.block_size, kv_dtype)
        if spec is not None and spec.method == "draft":  # the draft's K/V share the target's blocks
            block_bytes += ModelRunner.bytes_per_block(draft_model, cfg.block_size, kv_dtype)
        tail_slots = cfg.max_num_seqs + -(-cfg.max_num_batched_tokens // cfg.block_size) + 1 if exact else 0
        tail_bytes = tail_slots * KVTail.bytes_per_slot(len(model.layers), model.cfg.n_kv_heads, cfg.block_size,
                                                        model.cfg.hd) if exact else 0
        if not cfg.num_blocks and tail_bytes > cfg.kv_cache_bytes // 2:
            raise ValueError(f"the exact blocks of a {kv_dtype.name} KV cache need {tail_slots} slots (max_num_seqs + a "
                             f"step's blocks + 1) of {tail_bytes / tail_slots / 2**20:.2f} MiB, {tail_bytes / 2**20:.1f} MiB: "
                             f"more than half of kv_cache_bytes ({cfg.kv_cache_bytes / 2**20:.1f} MiB); raise "
                             "kv_cache_bytes, lower max_num_seqs or max_num_batched_tokens, or set kv_exact_blocks=False")
        num_blocks = cfg.num_blocks or max(1, (cfg.kv_cache_bytes - tail_bytes) // block_bytes)  # the slots are K/V memory
        self.max_model_len = min(cfg.max_model_len or model.cfg.max_seq_len, num_blocks * cfg.block_size)
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, compile=cfg.compile, kv_dtype=kv_dtype,
                                  batch_invariant=cfg.batch_invariant, free_window_kv=cfg.free_window_kv,
                                  tail_slots=tail_slots)
        self.block_manager = BlockGroups([BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching, window, table)
                                          for table, window in self.runner.kv_groups()])
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting)
        if self.runner.tail is not None:  # a slot whose block no sequence holds any more can be given back
            blocks = self.block_manager.managers[0].blocks
            self.runner.tail.in_use = lambda b: blocks[b].ref_count > 0
        # on the CPU every step reuses its large activations in place of new mappings (attnkit.kernels.allocator)
        self.malloc_tuned = self.runner.device.type == "cpu" and tune_malloc()
        self.loras: LoraAdapters | None = None  # created by the first add_lora
        self._grammars: Grammars | None = None  # created by the first constrained request
        self._grammars_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.spec = self._speculation(spec, draft_model, num_blocks, kv_dtype) if spec is not None else None

    def _speculation(self, spec: SpeculativeConfig, draft_model: nn.Module | None, num_blocks: int,
                     kv_dtype: KVFormat) -> SpecController:
        from .proposers import DraftModelProposer, LayerSkipProposer, NgramProposer, Proposer, as_fast_as_target, compatible

        controller = SpecController(spec, Proposer())
        if spec.method != "ngram" and len(self.runner.kv_groups()) > 1:
            raise ValueError(f"speculative method {spec.method!r}: the model's sliding-window layers keep their own "
                             "block tables; use free_window_kv=False or the 'ngram' method")
        if spec.method == "ngram":
            proposer: Proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
        elif spec.method == "draft":
            assert draft_model is not None
            compatible(self.model, draft_model)
            draft_model = as_fast_as_target(self.model, draft_model)
            proposer = DraftModelProposer(draft_model, num_blocks, self.config.block_size, kv_dtype, controller.draft)
        else:
            n = spec.draft_layers or max(1, len(self.model.layers) // 4)
            proposer = LayerSkipProposer(self.model, self.runner, n, controller.draft)
        controller.proposer = proposer
        return controller

    @classmethod
    def from_pretrained(cls, path: str | None = None, config: EngineConfig | None = None, **kw) -> LLMEngine:
        """Load a GGUF file or HF directory (None: the embedded default) and start an engine on it."""
        from ..loading import load_causal_lm

        lm = load_causal_lm(path, **kw)
        return cls(lm.model, lm.tokenizer, config, lm.stop_ids)

    # LoRA adapters
    def add_lora(self, name: str, directory: str | Path) -> None:
        """Serve the HF PEFT LoRA adapter saved in ``directory`` under ``name``."""
        if self.loras is None:
            self.loras = LoraAdapters(self.model)
            self.runner.lora_step = self.loras.step
        self.loras.add(name, directory)
        self.runner.native = None  # the C step is rebuilt at the next step, over the adapters now stacked

    def remove_lora(self, name: str) -> None:
        """Unload adapter ``name``; refused while a request uses it."""
        if self.loras is None:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: none)")
        adapter = self.loras.id_of(name)
        busy = [r.request_id for r in self.requests.values() if r.seqs[0].adapter == adapter]
        if busy:
            raise ValueError(f"LoRA adapter {name!r} is in use by {len(busy)} unfinished request(s)")
        self.loras.remove(name)
        self.runner.native = None

    def lora_names(self) -> list[str]:
        return self.loras.names() if self.loras is not None else []

    # structured outputs
    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this engine's tokenizer (xgrammar is loaded on first use)."""
        with self._grammars_lock:  # a server builds it from a worker thread; the engine may ask at the same time
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("SamplingParams.structured: constrained decoding needs a tokenizer")
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    # requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, lora: str | None = None) -> str:
        """Queue a request; ``lora`` names a loaded adapter to generate with (None: the base model)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.vocab_size)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty (it needs at least one token)")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if params.kv_window is not None or params.kv_budget is not None:
            self._check_streaming(params)
        elif len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the engine's max_model_len is {self.max_model_len}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings need a tokenizer")
        compiled = self.grammars.compile(params.structured) if params.structured is not None else None
        if lora is not None and self.loras is None:
            raise ValueError(f"no LoRA adapter named {lora!r} is loaded (loaded: none)")
        adapter = self.loras.id_of(lora) if self.loras is not None else 0
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.perf_counter()
        seqs = [Sequence(request_id, i, ids, params, adapter=adapter, arrival=now) for i in range(params.n)]
        if compiled is not None:
            for seq in seqs:
                seq.grammar = self.grammars.matcher(compiled)
        for child in seqs[1:]:
            child.parent = seqs[0]
        seqs[0].children = seqs[1:]
        self.scheduler.add(seqs)
        detoks = [IncrementalDetokenizer(self.tokenizer, ids[-4:], params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, now, detoks)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks go back to the pool immediately."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                seq.finish_time = time.perf_counter()
        return self._output(req)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               lora: str | None = None) -> Iterator[RequestOutput]:
        """Add one request and step the engine until it finishes, yielding its output after every step.

        Other requests in the engine progress too. Leaving the loop early (``break``, Ctrl-C) aborts it.
        """
        rid = self.add_request(prompt, params, lora=lora)
        try:
            while rid in self.requests:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
        finally:
            self.abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> BlockStats:
        return self.block_manager.stats()

    # the step loop
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if not self.scheduler.has_work():
                return []
            if self.scheduler._release_waiting_blocks():
                batch = self.scheduler.schedule()
            if not batch.seqs:
                if batch.num_preempted:
                    return []
                raise RuntimeError("the engine cannot schedule any sequence: the KV cache is too small")
        self.num_steps += 1
        if self.spec is not None:
            self._propose(batch)
        # the constrained sequences that sample this step: their token masks are filled while the forward runs
        constrained = [s for s, n in zip(batch.seqs, batch.num_tokens)
                       if s.grammar is not None and s.num_computed + n >= len(s)]
        masks = self.grammars.fill_async(constrained) if constrained else None
        t0 = time.perf_counter()
        logits, rows = self.runner.run(batch)
        if self.spec is not None and all(is_generated(s, n) for s, n in zip(batch.seqs, batch.num_tokens)):
            self.spec.target.add(sum(batch.num_tokens), time.perf_counter() - t0)  # decode rows only: the cost model
        self._prompt_logprobs(batch)
        if self.runner.observed:
            self._evict(batch)
        # a verifying sequence's drafts count as computed only once accepted (_sample)
        self.scheduler.computed(ScheduledBatch(batch.seqs, [n - len(s.spec_tokens) for s, n in
                                                            zip(batch.seqs, batch.num_tokens)]))
        touched = {s.request_id for s in batch.seqs}
        if rows:
            self._sample(logits, [batch.seqs[r] for r in rows], constrained, masks)
        outs = []
        for rid in touched:
            req = self.requests.get(rid)
            if req is None:
                continue
            out = self._output(req)
            outs.append(out)
            if out.finished:
                del self.requests[rid]
        return outs

    def _propose(self, batch: ScheduledBatch) -> None:
        """Give the step's decoding sequences their draft tokens (speculative decoding) and the blocks to verify
        them in; the controller decides how many each gets (none when it would not pay)."""
        spec, bm = self.spec, self.scheduler.bm
        assert spec is not None
        k_max = spec.config.num_speculative_tokens
        dec = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens))
               if is_generated(s, n) and s.num_computed == len(s) - 1]
        if not dec:
            return
        seqs = [batch.seqs[i] for i in dec]
        # never past max_tokens (k drafts emit up to k + 1 tokens) nor the context
        limits = [max(0, min(k_max, s.params.max_tokens - len(s.output_ids) - 1, self.max_model_len - len(s)))
                  for s in seqs]
        caps = [min(c, lim) for c, lim in zip(spec.proposer.caps(seqs, k_max), limits)]
        ks = spec.plan(seqs, caps, sum(batch.num_tokens) - len(dec))
        budget = self.config.max_num_batched_tokens - sum(batch.num_tokens)
        for j, (s, k) in enumerate(zip(seqs, ks)):
            k = min(k, max(budget, 0))
            if k and not bm.can_allocate(s, 1 + k):
                k = 0  # no blocks to spare: decode plainly rather than preempt anyone
            if k:
                batch.copies += bm.allocate(s, 1 + k)
                budget -= k
            ks[j] = k
        if not any(ks):
            return
        spec.proposer.copy_blocks(batch.copies)
        drafts = spec.proposer.propose(seqs, ks)
        for i, s, d, k in zip(dec, seqs, drafts, ks):
            s.spec_tokens = list(d[:k])
            batch.num_tokens[i] = 1 + len(s.spec_tokens)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], constrained: list[Sequence],
                masks: Future | None) -> None:
        """Sample each sequence's next token; a verifying sequence samples depth by depth from its rows, keeping
        its drafts while the target's token equals them (exact: see attnkit.engine.speculative)."""
        offsets, at = [], 0
        for s in seqs:
            offsets.append(at)
            at += 1 + len(s.spec_tokens)
        active = list(range(len(seqs)))
        accepted = [0] * len(seqs)
        depth = 0
        # every row plain greedy: one argmax over all the rows, no sampler call per depth (the same tokens)
        argmax = logits.argmax(-1).tolist() if masks is None and all(map(plain_greedy, seqs)) else None
        while active:
            cur = [seqs[i] for i in active]
            if argmax is not None:
                tokens, lps = [argmax[offsets[i] + depth] for i in active], [None] * len(active)
            else:
                tokens, lps = self._sample_depth(logits, offsets, active, cur, depth, constrained, masks)
            nxt = []
            for i, seq, tok, lp in zip(active, cur, tokens, lps):
                seq.append(tok)
                if lp is not None:
                    seq.logprobs.append(lp)
                if seq.grammar is None or self._advance_grammar(seq, tok):
                    self._check_stop(seq, tok)
                if depth < len(seq.spec_tokens) and tok == seq.spec_tokens[depth] and not seq.finished:
                    accepted[i] += 1
                    nxt.append(i)
            active, depth = nxt, depth + 1
        for i, seq in enumerate(seqs):
            if not seq.spec_tokens:
                continue
            self.spec.record(seq, len(seq.spec_tokens), accepted[i], accepted[i] + 1)  # type: ignore[union-attr]
            seq.spec_tokens = []
            if seq.finished:
                continue
            seq.num_computed += accepted[i]  # the accepted drafts' K/V were written by the verification
            seq.draft_computed = min(seq.draft_computed, seq.num_computed)
            self.scheduler.bm.register_full_blocks(seq)
            self.scheduler.bm.trim(seq)

    def _sample_depth(self, logits: torch.Tensor, offsets: list[int], active: list[int], cur: list[Sequence],
                      depth: int, constrained: list[Sequence], masks: Future | None):
        """Depth ``depth``'s tokens (and log-probabilities) of the active sequences, by the full sampler."""
        allowed = None
        if depth == 0 and masks is not None:  # filled while the forward ran
            at_row = {id(s): r for r, s in enumerate(cur)}
            pairs = [(i, at_row[id(s)]) for i, s in enumerate(constrained) if id(s) in at_row]
            allowed = (masks.result()[[i for i, _ in pairs]], [r for _, r in pairs])
        elif depth:
            rows = [r for r, s in enumerate(cur) if s.grammar is not None]
            if rows:
                allowed = (self.grammars.fill([cur[r].grammar for r in rows]), rows)
        return sample(logits[[offsets[i] + depth for i in active]], cur, self.eos_ids, allowed)

    def _prompt_logprobs(self, batch: ScheduledBatch) -> None:
        """Record log p(prompt token i | tokens before it), with the top alternatives, for the rows computed."""
        parts, logits = self.runner.prompt_logits
        if not parts:
            return
        lps = torch.log_softmax(logits, -1)  # (P, vocab)
        at = 0
        for row, first, count in parts:
            seq = batch.seqs[row]
            k = seq.params.prompt_logprobs or 0
            if not seq.prompt_logprobs:
                seq.prompt_logprobs = [None]
            targets = torch.tensor(seq.tokens[first + 1:first + 1 + count])
            chunk = lps[at:at + count]
            chosen = chunk.gather(1, targets[:, None])[:, 0].tolist()
            top = torch.topk(chunk, k) if k else None
            for i in range(count):
                if first + 1 + i < len(seq.prompt_logprobs):
                    continue  # recomputed after a preemption: already recorded
                d = {int(targets[i]): chosen[i]}
                if top is not None:
                    d.update({int(t): float(v) for t, v in zip(top.indices[i], top.values[i]) if int(t) not in d})
                seq.prompt_logprobs.append(d)
            at += count

    def _advance_grammar(self, seq: Sequence, tok: int) -> bool:
        """Feed the sampled token to the sequence's matcher; False if that finished the sequence (a complete
        grammar ends it even under ignore_eos: nothing may follow)."""
        if not seq.grammar.accept_token(tok) and tok not in self.eos_ids:
            # cannot happen with the mask applied; were it to, stop rather than emit text outside the language
            self._finish(seq, "stop", None)
            return False
        if seq.grammar.is_terminated():
            self._check_stop(seq, tok)  # the text of this last token, then finish
            if not seq.finished:
                self._finish(seq, "stop", None)
            return False
        return True

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        req = self.requests[seq.request_id]
        detok = req.detoks[seq.index]
        if not p.ignore_eos and tok in self.eos_ids and len(seq.output_ids) >= p.min_tokens:
            return self._finish(seq, "stop", None)
        if tok in (p.stop_token_ids or ()) and len(seq.output_ids) >= p.min_tokens:
            return self._finish(seq, "stop", tok)
        if detok is not None:
            new = detok.push(tok)
            if new:
                before = len(seq.text)
                seq.text += new
                for s in p.stop_strings:
                    at = seq.text.find(s, max(0, before - len(s) + 1))
                    if at >= 0:
                        seq.text = seq.text[:at]
                        return self._finish(seq, "stop", s)
        if len(seq.output_ids) >= p.max_tokens or (len(seq) >= self.max_model_len and p.kv_window is None
                                                   and p.kv_budget is None):
            self._finish(seq, "length", None)

    def _evict(self, batch: ScheduledBatch) -> None:
        """SnapKV (attnkit.engine.kv_eviction): a kv_budget sequence whose cache, with this step's chunk, holds more
        than its budget moves the rows its layers keep into new blocks and releases the old ones — once its prompt is
        read, after every chunk with ``kv_budget_stream``, or before its cache would outgrow the context. (With too
        few free blocks it keeps them all until a later chunk.)"""
        bm = self.scheduler.bm.managers[0]
        step = self.config.max_num_batched_tokens
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.seq_id not in self.runner.observed:
                continue
            p, cached = seq.params, seq.num_cached + n
            budget = p.kv_budget
            due = seq.num_computed + n >= len(seq) or p.kv_budget_stream or cached + step + budget > self.max_model_len
            new = bm.fresh_blocks(-(-budget // bm.block_size)) if cached > budget and due else None
            if new is None:
                del self.runner.observed[seq.seq_id]
                continue
            self.runner.compact(seq, bm.table_of(seq), new, cached, budget)
            bm.replace_table(seq, new)
            seq.kv_shift += cached - budget

    def _check_streaming(self, params: SamplingParams) -> None:
        """A request with ``kv_window`` (attention sinks) or ``kv_budget`` (SnapKV) drops K/V and runs past the
        context: what it needs of the engine."""
        why = None
        rot = getattr(self.model, "rotary", None)
        name = "kv_window" if params.kv_window is not None else "kv_budget"
        bs, step = self.config.block_size, self.config.max_num_batched_tokens
        if self.spec is not None:
            why = "speculative decoding keeps every draft's K/V"
        elif len(self.runner.kv_groups()) > 1 or any(w is not None for w in self.runner.windows):
            why = "the model's layers have sliding windows of their own"
        elif rot is None or getattr(self.model, "rotary_local", None) is not None or rot.length_dependent:
            why = "kept keys are re-rotated, which needs one RoPE whose frequencies do not depend on the length"
        else:
            if params.kv_window is not None:
                need = -(-params.attention_sinks // bs) * bs + params.kv_window + bs + step
                what = f"sinks + window + a block + a step's {step} tokens"
            else:
                need = 2 * -(-params.kv_budget // bs) * bs + 2 * step  # type: ignore[operator]
                what = f"the budget twice (while it is compacted) + two steps' {step} tokens"
            if need > self.runner.k_pool.shape[2] * bs:
                why = f"its cache ({what} = {need}) exceeds the KV pool's {self.runner.k_pool.shape[2] * bs} tokens"
        if why:
            raise ValueError(f"SamplingParams.{name}: {why}")

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        req = self.requests[seq.request_id]
        detok = req.detoks[seq.index]
        if detok is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            seq.text += detok.flush()
        self.scheduler.finish(seq, reason, stop_reason)
        seq.finish_time = time.perf_counter()

    def _output(self, req: Request) -> RequestOutput:
        hold = max((len(s) for s in req.params.stop_strings), default=1) - 1
        outs = []
        for s in req.seqs:
            text = s.text if s.finished or not hold else s.text[: max(0, len(s.text) - hold)]
            outs.append(CompletionOutput(s.index, text, list(s.output_ids), s.finish_reason, s.stop_reason,
                                         list(s.logprobs) if req.params.logprobs is not None else None))
        metrics = RequestMetrics(req.arrival, min((s.first_token_time for s in req.seqs if s.first_token_time),
                                                  default=None),
                                 max((s.finish_time or 0 for s in req.seqs), default=0) or None,
                                 sum(s.num_preemptions for s in req.seqs),
                                 num_draft_tokens=sum(s.spec_proposed for s in req.seqs),
                                 num_accepted_tokens=sum(s.spec_accepted for s in req.seqs))
        first = req.seqs[0]
        prompt_lps = None
        if req.params.prompt_logprobs is not None:
            prompt_lps = list(first.prompt_logprobs) if len(req.prompt_ids) > 1 else [None]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, all(s.finished for s in req.seqs),
                             metrics, prompt_lps)
