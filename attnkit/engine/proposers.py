"""The proposers of speculative decoding (:mod:`.speculative`): who guesses the next k tokens.

- :class:`NgramProposer` — prompt lookup (Saxena 2023; vLLM's ``ngram``): the longest recent suffix of 1 … n
  tokens that occurred earlier in the sequence, and the tokens that followed it then. No model, no K/V.
- :class:`DraftModelProposer` — a smaller model with the same vocabulary (a student from ``attnkit distill``),
  decoding greedily. Its K/V pool has the target's block count and is addressed by the target's block tables:
  the draft's K/V of a token lives at the same slot as the target's, so prefix caching, copy-on-write and freeing
  follow the target's block manager (``Sequence.draft_computed`` counts the tokens whose draft K/V are valid).
- :class:`LayerSkipProposer` — self-speculation (LayerSkip, Elhoushi et al. 2024, without its training): the
  target's first N layers, then its final norm and head. Those layers' K/V for accepted tokens are exactly the
  target's, so the draft reads and writes the target's own pool; the verification rewrites what it wrote.

Drafts are greedy: q puts all its mass on one token, which is what makes "sample the target, accept on equality"
the exact rejection-sampling rule (see :mod:`.speculative`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .kv_format import KVFormat
from .model_runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .speculative import StepCosts

_PARAMS = SamplingParams()


class Proposer:
    needs_kv = False  # True: proposes after the target's blocks for the draft tokens are allocated (writes K/V there)
    draft_cost = False  # True: proposing costs forward passes (the controller's draft costs)

    def caps(self, seqs: list[Sequence], k: int) -> list[int]:
        """The most tokens each sequence can be proposed (≤ k)."""
        return [k] * len(seqs)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ``ks[i]`` draft tokens continuing each sequence."""
        raise NotImplementedError

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """The target's copy-on-write copies, mirrored in a K/V pool of the proposer's own."""


class NgramProposer(Proposer):
    """Prompt lookup: an index from each n-gram (n = min … max) to where it last ended, kept per sequence and
    extended as the sequence grows, so a lookup costs O(new tokens)."""

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        self.n_min, self.n_max = n_min, n_max
        self._found: dict[int, list[int]] = {}

    def lookup(self, seq: Sequence, k: int) -> list[int]:
        toks = seq.tokens
        L = len(toks)
        if seq.ngram_index is None:
            seq.ngram_index = [{} for _ in range(self.n_max + 1)]
        index = seq.ngram_index
        for end in range(seq.ngram_upto, L - 1):  # n-grams ending at `end` (never the suffix itself) → end + 1
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                index[n][tuple(toks[end - n + 1:end + 1])] = end + 1
        seq.ngram_upto = max(seq.ngram_upto, L - 1)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            at = index[n].get(tuple(toks[L - n:]))
            if at is not None:
                return toks[at:at + k]
        return []

    def caps(self, seqs: list[Sequence], k: int) -> list[int]:
        self._found = {id(s): self.lookup(s, k) for s in seqs}
        return [len(self._found[id(s)]) for s in seqs]

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._found.get(id(s), [])[:k] if k else [] for s, k in zip(seqs, ks)]


@dataclass(eq=False)
class _DraftRow:
    """What the draft's model runner reads of a sequence: its tokens with the drafts so far, the tokens whose
    draft K/V are cached, and the target's block table."""
    tokens: list[int]
    num_computed: int
    block_table: list[int]
    params: SamplingParams = field(default_factory=lambda: _PARAMS)
    adapter: int = 0
    spec_tokens: list[int] = field(default_factory=list)
    window_table: list[int] = field(default_factory=list)
    kv_shift: int = 0  # no K/V dropped (kv_window / kv_budget requests take no speculation)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


class _GreedyDraft(Proposer):
    """A model run by its own ModelRunner over the target's block tables, decoding greedily k steps."""
    needs_kv = True
    draft_cost = True

    def __init__(self, runner: ModelRunner, costs: StepCosts) -> None:
        self.runner, self.costs = runner, costs

    def _computed(self, seq: Sequence) -> int:
        return seq.draft_computed

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        rows = [_DraftRow(list(s.tokens), min(self._computed(s), len(s) - 1), s.block_table) if k else None
                for s, k in zip(seqs, ks)]
        drafts: list[list[int]] = [[] for _ in seqs]
        for _ in range(max(ks, default=0)):
            act = [i for i, k in enumerate(ks) if len(drafts[i]) < k]
            if not act:
                break
            batch = ScheduledBatch([rows[i] for i in act], [len(rows[i]) - rows[i].num_computed for i in act])  # type: ignore[misc]
            t0 = time.perf_counter()
            logits, _ = self.runner.run(batch)  # every row's input is complete: one logits row each
            toks = logits.argmax(-1).tolist()
            if all(n == 1 for n in batch.num_tokens):
                self.costs.add(len(act), time.perf_counter() - t0)
            for j, i in enumerate(act):
                rows[i].num_computed = len(rows[i])
                rows[i].tokens.append(toks[j])
                drafts[i].append(toks[j])
        for s, r in zip(seqs, rows):
            if r is not None:
                s.draft_computed = r.num_computed
        return drafts


class DraftModelProposer(_GreedyDraft):
    def __init__(self, draft: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype | KVFormat,
                 costs: StepCosts) -> None:
        runner = ModelRunner(draft, num_blocks, block_size, kv_dtype=kv_dtype, batch_invariant=False, free_window_kv=False)
        super().__init__(runner, costs)

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        self.runner.copy_blocks([(0, s, d) for g, s, d in copies if g == 0])


class LayerSkipProposer(_GreedyDraft):
    def __init__(self, target: nn.Module, target_runner: ModelRunner, n_layers: int, costs: StepCosts) -> None:
        check_draft_layers(target, n_layers)
        super().__init__(ModelRunner(first_layers(target, n_layers), target_runner.k_pool.shape[2],
                                     target_runner.block_size, kv_dtype=target_runner.kv_format,
                                     batch_invariant=False, free_window_kv=False, pools=(target_runner.k_pool[:n_layers], target_runner.v_pool[:n_layers])), costs)

    def _computed(self, seq: Sequence) -> int:
        return seq.num_computed  # the shared layers' K/V are the target's


def check_draft_layers(model: nn.Module, n_layers: int) -> None:
    """A layer-skipping draft keeps at least one of ``model``'s layers and drops at least one."""
    n = len(model.layers)
    if not 1 <= n_layers < n:
        raise ValueError(f"the draft's layers must be in [1, {n - 1}] for this {n}-layer model, got {n_layers}")


def first_layers(model: nn.Module, n: int) -> nn.Module:
    """A view of ``model`` with only its first ``n`` layers (the same parameters, nothing copied)."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.layers = nn.ModuleList(list(model.layers[:n]))
    view.cfg = replace(model.cfg, n_layers=n)
    return view


def compatible(target: nn.Module, draft: nn.Module) -> None:
    """A draft model must speak the target's vocabulary."""
    tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
    if tv != dv:
        raise ValueError(f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}): "
                         "a draft model needs the target's tokenizer")


def as_fast_as_target(target: nn.Module, draft: nn.Module) -> nn.Module:
    """A float draft (an HF student) beside a target on GGUF blocks is quantized to Q8_0 blocks in memory: else
    each of its layers, read in float32, would cost more than one of the target's."""
    from ..quant.native import GGUFBlockLinear, to_blocks

    def on_blocks(m: nn.Module) -> bool:
        return any(isinstance(x, GGUFBlockLinear) for x in m.modules())

    if on_blocks(target) and not on_blocks(draft) and next(draft.parameters()).dtype == torch.float32:
        to_blocks(draft, "Q8_0")
    return draft
