"""A sequence: one stream of tokens being generated, and the state the engine keeps for it.

The prompt and the generated tokens live in one list; ``num_computed`` counts the tokens whose
keys/values are in the KV cache (prefix-cache hits and prefill chunks advance it), and
``block_table`` maps the sequence's logical KV blocks to physical ones (vLLM, Kwon et al. 2023, §4.2).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int = 0  # the LoRA adapter's id (attnkit.engine.lora); 0 = the base model
    arrival: float = field(default_factory=time.perf_counter)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are cached
    block_table: list[int] = field(default_factory=list)
    window_table: list[int] = field(default_factory=list)  # the sliding-window layers' blocks (-1: freed), if apart
    num_hashed_blocks: int = 0  # leading blocks already registered for prefix caching
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading full blocks (prefix caching)
    parent: Sequence | None = None  # n > 1: waits for its parent's prefill, then forks its blocks
    children: list[Sequence] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: Any = None  # the structured-output matcher (attnkit.engine.grammar), if constrained
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text: str = ""  # detokenised output (stop strings removed)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)  # filled as the prompt is computed
    num_preemptions: int = 0
    # speculative decoding (attnkit.engine.speculative): this step's draft tokens, the tokens whose draft-model K/V
    # are cached, the prompt-lookup index, decayed accept/reject counts (the controller's α) and totals
    spec_tokens: list[int] = field(default_factory=list)
    draft_computed: int = 0
    ngram_index: list[dict] | None = None
    ngram_upto: int = 0
    spec_acc: float = 0.0
    spec_rej: float = 0.0
    spec_idle: int = 0  # decode steps since it last had drafts (the controller's probe)
    spec_probe_every: int = 16  # steps without drafts before the next probe (speculative.PROBE_EVERY, doubled per failure)
    spec_proposed: int = 0
    spec_accepted: int = 0
    # StreamingLLM (params.kv_window): tokens dropped from the cache after the sinks (whole blocks: a token at
    # position p ≥ sinks is at cache index p − kv_shift), and the blocks holding the sinks' K/V as first computed
    # while the table's first blocks hold them rotated kv_shift positions on (BlockManager.slide)
    kv_shift: int = 0
    sink_source: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)  # prompt + output, the model's input
        if self.params.seed is not None:
            seed = self.params.seed if self.index == 0 else hash((self.params.seed, self.index)) & (2**63 - 1)
            self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_cached(self) -> int:
        """The cache index after the computed tokens: their count less those dropped (StreamingLLM)."""
        return self.num_computed - self.kv_shift

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        """True while more than the newest token still has to go through the model."""
        return self.num_uncomputed > 1

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.output_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
