"""Perplexity of a causal language model over a text, and greedy agreement between two models.

    PPL = exp( −1/N · Σ_i log p(x_i | x_<i) )        over the N scored tokens (all but the first)

A text longer than the model's window is scored with a strided sliding window (the method of the
transformers docs' "Perplexity of fixed-length models"): windows of ``window`` tokens end every
``stride`` tokens, and each scores only the tokens the previous window did not, so every token is
predicted once, with at least ``window − stride`` tokens of context (except near the start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TEXTS = Path(__file__).resolve().parent.parent / "data" / "texts"


def shipped_text(name: str = "founding_documents") -> str:
    """A public-domain text shipped in attnkit/data/texts, without its header paragraph (source and licence)."""
    path = TEXTS / f"{name}.txt"
    if not path.exists():
        have = sorted(p.stem for p in TEXTS.glob("*.txt"))
        raise ValueError(f"no shipped text {name!r} (have: {', '.join(have)})")
    return path.read_text(encoding="utf-8").split("\n\n", 1)[1].strip() + "\n"


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    nll_std_err: float | None = None  # the standard error of the mean NLL, where the scorer kept each token's

    @property
    def ppl_std_err(self) -> float | None:
        """PPL's uncertainty to first order, PPL · σ(mean NLL) (llama-perplexity's "±")."""
        return None if self.nll_std_err is None else self.ppl * self.nll_std_err


def _ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (L,)
    if t.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; got {t.numel()}")
    return t


@torch.inference_mode()
def perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, window: int = 512,
               stride: int | None = None) -> Perplexity:
    """Perplexity of ``model`` (token ids (1, T) → logits (1, T, vocab)) over ``ids`` with a strided window.

    The first window scores its tokens 1 … window−1; each next window ends ``stride`` tokens later (default
    window // 2) and scores only those, with at least ``window − stride`` tokens of context before them.
    """
    stride = window // 2 if stride is None else stride
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window; got stride={stride}, window={window}")
    x = _ids(ids)
    L = x.numel()
    total, n, done = 0.0, 0, 1  # done: tokens already scored or unscorable (the first has no context)
    while done < L:
        end = min(done + (window - 1 if done == 1 else stride), L)
        begin = max(0, end - window)
        logits = model(x[None, begin:end])[0].float()  # (end − begin, vocab)
        pred = logits[done - 1 - begin : end - 1 - begin]  # predictions of tokens done … end−1
        total += float(F.cross_entropy(pred, x[done:end], reduction="sum"))
        n += end - done
        done = end
    nll = total / n
    return Perplexity(math.exp(nll), nll, n)


@torch.inference_mode()
def chunked_perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, n_ctx: int = 512,
                       bos: int | None = None) -> Perplexity:
    """Perplexity as llama.cpp's ``llama-perplexity`` computes it, for figures comparable with its own.

    The text is cut into ⌊L / n_ctx⌋ disjoint chunks (the tail is dropped); each chunk is one forward pass
    (its first token replaced by ``bos`` when the model's vocabulary adds one), and only the second half of
    each chunk is scored: the tokens n_ctx/2 + 1 … n_ctx − 1, each with at least n_ctx/2 tokens of context.
    """
    first, total, n = n_ctx // 2, 0.0, 0
    for chunk in _chunks(_ids(ids), n_ctx, bos):
        logits = model(chunk[None])[0].float()  # (n_ctx, vocab)
        total += float(F.cross_entropy(logits[first:-1], chunk[first + 1:], reduction="sum"))
        n += n_ctx - 1 - first
    return Perplexity(math.exp(total / n), total / n, n)


def _chunks(x: torch.Tensor, n_ctx: int, bos: int | None) -> list[torch.Tensor]:
    chunks = x.numel() // n_ctx
    if chunks < 1 or n_ctx < 4:
        raise ValueError(f"need at least one chunk of n_ctx >= 4 tokens; got {x.numel()} tokens, n_ctx={n_ctx}")
    out = [x[c * n_ctx:(c + 1) * n_ctx].clone() for c in range(chunks)]
    if bos is not None:
        for chunk in out:
            chunk[0] = bos
    return out


def engine_perplexity(llm, ids: Sequence[int] | torch.Tensor, n_ctx: int = 512, bos: int | None = None) -> Perplexity:
    """:func:`chunked_perplexity` scored by an attnkit engine (an ``LLM``): each chunk one request whose prompt
    log-probabilities the engine records (``SamplingParams(prompt_logprobs=0)``), all chunks in one batch — the
    engine's own products, attention and K/V cache (float16 by default, as llama.cpp's), at its prefill speed."""
    from ..engine.sampling_params import SamplingParams

    chunks = _chunks(_ids(ids), n_ctx, bos)
    outs = llm.generate([c.tolist() for c in chunks], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    first = n_ctx // 2
    nll = torch.tensor([-out.prompt_logprobs[i][int(chunk[i])]  # prompt_logprobs: [None, {token_1: log p}, ...]
                        for chunk, out in zip(chunks, outs) for i in range(first + 1, n_ctx)], dtype=torch.float64)
    mean = float(nll.mean())
    err = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else None
    return Perplexity(math.exp(mean), mean, len(nll), err)


@dataclass(frozen=True)
class Divergence:
    kl: float  # mean KL(P_a ‖ P_b) over the positions, nats
    top1: float  # fraction of positions where the two models' most likely next token is the same
    n_positions: int


@torch.inference_mode()
def divergence(model_a: nn.Module, model_b: nn.Module, ids: Sequence[int] | torch.Tensor) -> Divergence:
    """How far model_b's next-token distributions are from model_a's on one window of ``ids``.

    KL(P_a ‖ P_b) = Σ_v P_a(v)·(log P_a(v) − log P_b(v)), averaged over positions — the statistic llama.cpp's
    perplexity tool reports for quantized models (``--kl-divergence``); far less noisy on a short text than
    a perplexity ratio, which a few tokens can move by a percent.
    """
    x = _ids(ids)[None]  # (1, T)
    la = torch.log_softmax(model_a(x)[0].float(), -1)  # (T, vocab)
    lb = torch.log_softmax(model_b(x)[0].float(), -1)
    kl = (la.exp() * (la - lb)).sum(-1)  # (T,)
    top1 = (la.argmax(-1) == lb.argmax(-1)).float().mean()
    return Divergence(float(kl.mean()), float(top1), x.shape[1])


@dataclass(frozen=True)
class ChunkedDivergence:
    kl: float  # mean KL(P_base ‖ P_model) per scored token, nats
    kl_std_err: float
    kl_p99: float  # the 99th percentile of the per-token KL
    top1: float  # fraction of scored tokens where the two models' most likely next token is the same
    n_tokens: int
    nll: float  # the model's mean NLL of the scored tokens (its chunked_perplexity's), from the same logits
    base_nll: float  # the base's


@torch.inference_mode()
def chunked_divergence(model: nn.Module, base: nn.Module, ids: Sequence[int] | torch.Tensor, n_ctx: int = 512,
                       bos: int | None = None) -> ChunkedDivergence:
    """How far ``model``'s next-token distributions are from ``base``'s over the tokens :func:`chunked_perplexity`
    scores: llama-perplexity's ``--kl-divergence`` statistics (a quantized file against its float original)."""
    kls, same, nll, base_nll = [], 0, 0.0, 0.0
    first = n_ctx // 2
    for chunk in _chunks(_ids(ids), n_ctx, bos):
        lb = torch.log_softmax(base(chunk[None])[0, first:-1].double(), -1)  # (n_ctx − 1 − first, vocab)
        lm = torch.log_softmax(model(chunk[None])[0, first:-1].double(), -1)
        kls.append((lb.exp() * (lb - lm)).sum(-1).clamp(min=0.0))
        same += int((lb.argmax(-1) == lm.argmax(-1)).sum())
        targets = chunk[first + 1:, None]
        nll -= float(lm.gather(1, targets).sum())
        base_nll -= float(lb.gather(1, targets).sum())
    kl = torch.cat(kls)
    n = len(kl)
    err = float(kl.std() / math.sqrt(n)) if n > 1 else 0.0
    return ChunkedDivergence(float(kl.mean()), err, float(torch.quantile(kl, 0.99)), same / n, n, nll / n, base_nll / n)


@dataclass(frozen=True)
class Agreement:
    rate: float  # fraction of the n positions where model B's greedy token is model A's
    prefix: int  # tokens the two greedy continuations share before they first differ
    n: int
    tokens: list[int]  # model A's greedy continuation


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt_ids: Sequence[int], n: int) -> list[int]:
    """``n`` greedy tokens after the prompt (with the model's KV cache when it has one)."""
    ids = list(prompt_ids)
    if hasattr(model, "new_cache"):
        cache = model.new_cache()
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)
        out: list[int] = []
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            if len(out) < n:
                logits = model(torch.tensor([[out[-1]]]), cache=cache, last_only=True)
        return out
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


@torch.inference_mode()
def greedy_agreement(model_a: nn.Module, model_b: nn.Module, prompt_ids: Sequence[int], n: int = 128,
                     tokens_a: list[int] | None = None) -> Agreement:
    """How often ``model_b`` picks ``model_a``'s greedy token, fed ``model_a``'s continuation (teacher forcing).

    The first disagreement is also where B's own greedy continuation would leave A's (``prefix``);
    ``rate`` keeps counting after it, so one early near-tie does not hide that the models otherwise agree.
    ``tokens_a``: model_a's greedy continuation when already known (comparing many models with one reference).
    """
    if n < 1 or len(prompt_ids) < 1:
        raise ValueError(f"need n >= 1 and a non-empty prompt; got n={n}, {len(prompt_ids)} prompt tokens")
    a = greedy_tokens(model_a, prompt_ids, n) if tokens_a is None else list(tokens_a)[:n]
    if len(a) != n:
        raise ValueError(f"tokens_a has {len(a)} tokens, expected n={n}")
    seq = torch.tensor([list(prompt_ids) + a[:-1]])  # (1, P + n − 1)
    b = model_b(seq)[0, len(prompt_ids) - 1 :].argmax(-1).tolist()  # B's choice at each of the n positions
    same = [x == y for x, y in zip(a, b)]
    prefix = same.index(False) if False in same else n
    return Agreement(sum(same) / n, prefix, n, a)
