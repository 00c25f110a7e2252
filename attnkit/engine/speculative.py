"""Speculative decoding: propose k tokens cheaply, verify them in ONE forward of the target, keep the agreeing run.

A decode step on a CPU reads every weight to produce one token; scoring k + 1 tokens of a sequence costs little
more. Each step a proposer (:mod:`.proposers`: n-gram prompt lookup, a draft model, or the target's own first
layers) guesses ``d_1 … d_k``; the target runs ``[last, d_1 … d_k]`` as k + 1 decode rows (each exactly as a decode
step at its position would be computed: batch invariance) and the engine samples depth by depth: at depth i the
target's token ``t_i`` is drawn from row i (every logit processor, penalty, grammar mask and seeded generator
applied as without speculation); ``d_{i+1}`` is accepted iff ``t_i == d_{i+1}``; the first disagreeing ``t_i``
(or the bonus token after k agreements) ends the run.

This is Leviathan et al. (2023) / Chen et al. (2023)'s rejection sampling for a proposer that puts all its mass on
one token (q = δ_d): accept d with probability min(1, p(d)/q(d)) = p(d), else draw from the residual
(p − q)⁺ ∝ p restricted to tokens ≠ d. Drawing t ~ p and accepting iff t = d has exactly these probabilities, so
every emitted token has the target's distribution — and since each emitted token consumes one draw of the
sequence's generator, as without speculation, greedy *and seeded* outputs are identical to the plain engine's.

How many tokens to propose (:class:`SpecController`) follows a cost model fitted online to the machine: a step of
R rows takes ``a + b·R`` seconds (least squares over recent steps), a draft depth ``c + e·rows``; each sequence's
acceptance rate α is tracked (decayed counts), and the i-th proposed token is worth α^i expected tokens. Proposals
are added greedily while their expected tokens per second beat the step's, so speculation fades out by itself
as the batch grows (the rows cost more than they return) or as a sequence's acceptance falls; a sequence left
without drafts gets one after ``PROBE_EVERY`` steps, so that an estimate that fell low can recover — and twice as
many steps after each probe that fails (to ``PROBE_MAX``): a proposer that never agrees (layer skip on an untrained
model: 1–7%) would otherwise pay a draft pass and a verification row in most steps of a large batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sequence import Sequence

if TYPE_CHECKING:
    from .proposers import Proposer

METHODS = ("ngram", "draft", "layerskip")
PROBE_EVERY = 16  # decode steps without drafts after which a sequence is given one (its acceptance re-measured)
PROBE_MAX = 256  # a probe that fails doubles the sequence's wait for the next, up to this many steps


@dataclass
class SpeculativeConfig:
    """``method``: "ngram" (prompt lookup) | "draft" (``draft_model``: a path, or None with a model passed to the
    engine) | "layerskip" (the first ``draft_layers`` layers of the target); ``num_speculative_tokens``: the most
    proposed per step (the controller may propose fewer); ``adaptive`` False: always propose that many."""
    method: str = "ngram"
    num_speculative_tokens: int = 5
    draft_model: str | None = None
    draft_layers: int | None = None  # layerskip; None: a quarter of the target's layers
    ngram_min: int = 1  # prompt lookup: the longest suffix of 1 … ngram_max tokens found earlier wins
    ngram_max: int = 4
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {list(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min/ngram_max must satisfy 1 <= min <= max, got {self.ngram_min}/{self.ngram_max}")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise ValueError(f"draft_layers must be >= 1, got {self.draft_layers}")

    @classmethod
    def parse(cls, spec: str | SpeculativeConfig | None, num_speculative_tokens: int | None = None) -> SpeculativeConfig | None:
        """``"ngram"``, ``"draft:PATH"`` or ``"layerskip:N"`` (the CLI's ``--speculative``) → a config; None stays None."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        method, _, arg = str(spec).partition(":")
        kw: dict = {}
        if num_speculative_tokens is not None:
            kw["num_speculative_tokens"] = num_speculative_tokens
        if method == "draft":
            if not arg:
                raise ValueError("--speculative draft:PATH needs the draft model's path")
            kw["draft_model"] = arg
        elif method == "layerskip" and arg:
            if not arg.isdigit():
                raise ValueError(f"--speculative layerskip:N needs a number of layers, got {arg!r}")
            kw["draft_layers"] = int(arg)
        elif method == "ngram" and arg:
            raise ValueError(f"--speculative ngram takes no argument, got {arg!r}")
        return cls(method=method, **kw)


@dataclass
class SpecStats:
    """Counts over the engine's life (``/metrics``, ``attnkit bench``)."""
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens the target agreed with
    verifications: int = 0  # sequence-steps that verified at least one draft token
    emitted: int = 0  # tokens those sequence-steps emitted (accepted + the target's own)
    rejected: int = 0  # verifications that ended on a disagreement (not all proposed tokens accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying sequence-step (1 = nothing gained)."""
        return self.emitted / self.verifications if self.verifications else 0.0


@dataclass
class StepCosts:
    """Seconds per step as ``a + b·rows``, fitted by least squares over the recent steps (a prior until the rows
    have varied enough to separate the two). The window's sums are kept as steps come and go: O(1) a step."""
    a: float = 0.0
    b: float = 0.0
    window: int = 256
    prior_ratio: float = 0.05  # b/a before there is evidence: one more row ≈ 5% of a step
    samples: deque = field(default_factory=deque)
    _sums: list[float] = field(default_factory=lambda: [0.0] * 4)  # Σx, Σy, Σx², Σxy over the window

    def add(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))
        self._update(rows, seconds, 1.0)
        if len(self.samples) > self.window:
            self._update(*self.samples.popleft(), -1.0)
        n = len(self.samples)
        sx, sy, sxx, sxy = self._sums
        mx, my = sx / n, sy / n
        var = sxx - n * mx * mx  # Σ(x − x̄)²
        if var >= n * 0.5 and n >= 8:
            b = (sxy - n * mx * my) / var
            a = my - b * mx
            if a > 0 and b > 0:
                self.a, self.b = a, b
                return
        if self.a == 0.0 or var < n * 0.5:  # rows all alike: keep the prior's split of the mean
            self.a = my / (1 + self.prior_ratio * mx)
            self.b = self.a * self.prior_ratio

    def _update(self, x: float, y: float, sign: float) -> None:
        for i, v in enumerate((x, y, x * x, x * y)):
            self._sums[i] += sign * v

    @property
    def known(self) -> bool:
        return self.a > 0


class SpecController:
    """Chooses each decoding sequence's number of draft tokens, asks the proposer, and keeps the statistics."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        self.stats = SpecStats()
        self.target = StepCosts()
        self.draft = StepCosts(prior_ratio=0.05)
        self.alpha_prior = 0.5

    # planning
    @staticmethod
    def alpha(seq: Sequence, prior: float) -> float:
        """The sequence's per-token acceptance estimate: decayed counts with a prior of two pseudo-observations."""
        return (seq.spec_acc + 2 * prior) / (seq.spec_acc + seq.spec_rej + 2)

    def plan(self, seqs: list[Sequence], caps: list[int], other_rows: int) -> list[int]:
        """How many draft tokens each decoding sequence gets (≤ its cap), given ``other_rows`` prompt rows in the step."""
        k_max = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return [min(k_max, c) for c in caps]
        if not self.target.known:  # the first step measures the plain decode
            return [0] * len(seqs)
        a, b = self.target.a, self.target.b
        draft_cost = self.proposer.draft_cost
        c, e = (self.draft.a, self.draft.b) if draft_cost and self.draft.known else (0.0, 0.0)
        rows = len(seqs) + other_rows
        time_now = a + b * rows
        tokens = float(len(seqs))
        ks = [0] * len(seqs)
        alphas = [self.alpha(s, self.alpha_prior) for s in seqs]
        gains = [alphas[i] if caps[i] > 0 else 0.0 for i in range(len(seqs))]  # the next draft token's worth
        depth = 0
        while True:
            best, best_rate = -1, 0.0
            for i, g in enumerate(gains):
                if g <= 0.0:
                    continue
                cost = b + e + (c if draft_cost and ks[i] + 1 > depth else 0.0)
                if g / cost > best_rate:
                    best, best_rate = i, g / cost
            if best < 0 or best_rate <= tokens / time_now:
                break
            cost = b + e + (c if draft_cost and ks[best] + 1 > depth else 0.0)
            ks[best] += 1
            depth = max(depth, ks[best])
            time_now += cost
            tokens += gains[best]
            gains[best] = gains[best] * alphas[best] if ks[best] < min(k_max, caps[best]) else 0.0
        for i, s in enumerate(seqs):  # a sequence not speculating probes now and then: its α may have changed
            if ks[i]:
                s.spec_idle = 0
            elif caps[i] and s.spec_idle >= s.spec_probe_every:
                ks[i], s.spec_idle = 1, 0
            else:
                s.spec_idle += 1
        return ks

    def record(self, seq: Sequence, proposed: int, accepted: int, emitted: int) -> None:
        """A verification's outcome: per-sequence decayed counts and the engine's totals."""
        seq.spec_probe_every = PROBE_EVERY if accepted else min(PROBE_MAX, 2 * seq.spec_probe_every)
        seq.spec_acc = 0.8 * seq.spec_acc + accepted
        seq.spec_rej = 0.8 * seq.spec_rej + (1 if accepted < proposed else 0)
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        old = self.stats  # replaced whole: a reader in another thread (/metrics) never sees half an update
        self.stats = st = SpecStats(old.proposed + proposed, old.accepted + accepted, old.verifications + 1,
                                    old.emitted + emitted, old.rejected + (accepted < proposed))
        # the prior for new sequences follows what this engine's proposer achieves
        self.alpha_prior = min(0.9, max(0.1, (st.accepted + 1) / (st.accepted + st.rejected + 2)))
