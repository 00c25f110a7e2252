"""Perplexity of a causal language model over a text, and greedy agreement between two models.

    PPL = exp( −1/N · Σ_i log p(x_i | x_<i) )        over the N scored tokens (all but the first)

A text longer than the model's window is scored with a strided sliding window (the method of the
transformers docs' "Perplexity of fixed-length models"): windows of ``window`` tokens start every
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


def _ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (L,)
    if t.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; got {t.numel()}")
    return t


@torch.inference_mode()
def perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, window: int = 512, stride: int = 256) -> Perplexity:
    """Perplexity of ``model`` (token ids (1, T) → logits (1, T, vocab)) over ``ids`` with a strided window."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    x = _ids(ids)
    L = x.numel()
    total, n, done = 0.0, 0, 1  # done: tokens already scored or unscorable (the first has no context)
    for start in range(0, L - 1, stride):
        end = min(start + window, L)
        logits = model(x[None, start:end])[0].float()  # (T, vocab)
        targets = x[done:end]  # the tokens this window scores
        pred = logits[done - 1 - start : end - 1 - start]  # their predictions, one position earlier
        total += float(F.cross_entropy(pred, targets, reduction="sum"))
        n += targets.numel()
        done = end
        if end == L:
            break
    nll = total / n
    return Perplexity(math.exp(nll), nll, n)


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
def greedy_agreement(model_a: nn.Module, model_b: nn.Module, prompt_ids: Sequence[int], n: int = 128) -> Agreement:
    """How often ``model_b`` picks ``model_a``'s greedy token, fed ``model_a``'s continuation (teacher forcing).

    The first disagreement is also where B's own greedy continuation would leave A's (``prefix``);
    ``rate`` keeps counting after it, so one early near-tie does not hide that the models otherwise agree.
    """
    if n < 1 or len(prompt_ids) < 1:
        raise ValueError(f"need n >= 1 and a non-empty prompt; got n={n}, {len(prompt_ids)} prompt tokens")
    a = greedy_tokens(model_a, prompt_ids, n)
    seq = torch.tensor([list(prompt_ids) + a[:-1]])  # (1, P + n − 1)
    b = model_b(seq)[0, len(prompt_ids) - 1 :].argmax(-1).tolist()  # B's choice at each of the n positions
    same = [x == y for x, y in zip(a, b)]
    prefix = same.index(False) if False in same else n
    return Agreement(sum(same) / n, prefix, n, a)
