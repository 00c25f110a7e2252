"""The batched sampler: every request's own settings applied to the whole batch at once.

Order (as in vLLM): logit bias → min_tokens (EOS/stop tokens masked) → repetition penalty (CTRL,
Keskar et al. 2019: positive logits divided by r, negative multiplied) → presence/frequency
penalties (OpenAI) → the grammar's token mask (structured outputs) → log-probabilities reported → greedy rows take the argmax; the others divide by
temperature, keep the top-k, the nucleus top-p (Holtzman et al. 2020) and tokens with p ≥ min_p·p_max
(Nguyen et al. 2024), and sample with the exponential race argmax(p_i / E_i), E_i ~ Exp(1) — the
same distribution as multinomial, but each seeded row draws its E from its own generator, so its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .grammar import allowed_tokens, apply_bitmask
from .sequence import Sequence


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def _counts(rows: list[list[int]], vocab: int) -> torch.Tensor:
    """(B, vocab) occurrence counts of each row's token ids."""
    ids = _pad(rows, vocab)
    c = torch.zeros(len(rows), vocab + 1)
    c.scatter_add_(1, ids, torch.ones(ids.shape))
    return c[:, :vocab]


def apply_penalties_and_bias(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: set[int]) -> torch.Tensor:
    """The logit processors (in place on a float32 (B, V) copy)."""
    B, V = logits.shape
    for r, s in enumerate(seqs):
        p = s.params
        if p.logit_bias:
            logits[r, list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()))
        if len(s.output_ids) < p.min_tokens:
            banned = set(p.stop_token_ids or []) | (set() if p.ignore_eos else eos_ids)
            if banned:
                logits[r, [t for t in banned if t < V]] = float("-inf")
    rows = [r for r, s in enumerate(seqs) if s.params.repetition_penalty != 1.0 or s.params.presence_penalty
            or s.params.frequency_penalty]
    if rows:
        sub = logits[rows]
        counts = _counts([seqs[r].output_ids for r in rows], V)
        rep = torch.tensor([seqs[r].params.repetition_penalty for r in rows])[:, None]
        seen = (counts > 0) | (_counts([seqs[r].prompt_ids for r in rows], V) > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([seqs[r].params.frequency_penalty for r in rows])[:, None]
        pres = torch.tensor([seqs[r].params.presence_penalty for r in rows])[:, None]
        logits[rows] = sub - freq * counts - pres * (counts > 0).float()
    return logits


def apply_grammar(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask the tokens the rows' grammars forbid (in place). Should the other processors have left a row
    nothing its grammar allows (min_tokens banning the EOS a finished grammar asks for), the grammar wins."""
    if not rows:
        return
    apply_bitmask(logits, bitmask, rows)
    dead = torch.isneginf(logits[rows]).all(-1)  # (len(rows),)
    for i in torch.nonzero(dead)[:, 0].tolist():
        logits[rows[i], allowed_tokens(bitmask[i], logits.shape[1])] = 0.0


def plain_greedy(seq: Sequence) -> bool:
    """Whether the sequence's next tokens are the argmax of its raw logits at every depth of a step: greedy, and
    no processor before the argmax can apply (no bias, penalties, grammar, min_tokens still banning EOS) nor
    log-probabilities are wanted. Such rows skip :func:`sample` (its copies and per-row loops): the same tokens."""
    p = seq.params
    return (p.greedy and not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and p.logprobs is None and seq.grammar is None
            and len(seq.output_ids) >= p.min_tokens)


def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: set[int] = frozenset(),
           allowed: tuple[torch.Tensor, list[int]] | None = None) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits (B, V) → one token per row, and per row its log-probabilities if requested. ``allowed``: the
    grammar bitmasks of the constrained rows and which rows they are (:mod:`attnkit.engine.grammar`)."""
    # on the CPU: (B, vocab) is small, and seeded rows draw from CPU generators
    logits = apply_penalties_and_bias(logits.detach().float().cpu().clone(), seqs, set(eos_ids))
    if allowed is not None:
        apply_grammar(logits, *allowed)
    B, V = logits.shape
    want_lp = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
    logprobs = torch.log_softmax(logits[want_lp], -1) if want_lp else None
    greedy = torch.tensor([s.params.greedy for s in seqs])
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        temp = torch.tensor([s.params.temperature if not s.params.greedy else 1.0 for s in seqs])[:, None]
        x = logits / temp
        top_k = torch.tensor([s.params.top_k if 0 < s.params.top_k < V else V for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs])[:, None]
        min_p = torch.tensor([s.params.min_p for s in seqs])[:, None]
        if bool((top_k < V).any()) or bool((top_p < 1).any()):
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            kth = sorted_x.gather(1, (top_k - 1)[:, None])
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
            probs_sorted = torch.softmax(sorted_x, -1)
            drop = (probs_sorted.cumsum(-1) - probs_sorted) >= top_p  # mass before this token already ≥ top_p
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        probs = torch.softmax(x, -1)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
        race = torch.empty_like(probs)
        seeded = [r for r, s in enumerate(seqs) if s.generator is not None]
        if len(seeded) < B:
            race.exponential_()
        for r in seeded:
            if not seqs[r].params.greedy:
                race[r].exponential_(generator=seqs[r].generator)
        sampled = (probs / race).argmax(-1)
        tokens = torch.where(greedy, tokens, sampled)
    out = tokens.tolist()
    lps: list[dict[int, float] | None] = [None] * B
    if logprobs is not None:
        for i, r in enumerate(want_lp):
            k = seqs[r].params.logprobs or 0
            d = {out[r]: float(logprobs[i, out[r]])}
            if k:
                top = torch.topk(logprobs[i], k)
                d.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
            lps[r] = d
    return out, lps
