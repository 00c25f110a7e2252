"""Single-stream autoregressive decoding with a KV cache, and the sampling rules.

p(x_t | x_<t) = softmax(logits_t / temperature); before sampling, keep only the ``top_k`` most
likely tokens (Fan et al. 2018) and/or the smallest set whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020). temperature = 0 is greedy decoding (argmax).

The prompt is run once (prefill), then one token per step, reusing the cached keys and values.
This small loop is the reference decoder: ``attnkit generate/chat`` and :class:`attnkit.LLM` run on
the batched engine (:mod:`attnkit.engine`), which is tested against it; models the engine does not
run yet (GPT-2) still decode here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


class CausalModel(Protocol):
    def new_cache(self) -> list: ...
    def __call__(self, idx: torch.Tensor, cache: list | None = None, last_only: bool = False) -> torch.Tensor: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from next-token ``logits`` (vocab,)."""
    if p.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: CausalModel, prompt: list[int], params: SamplingParams = SamplingParams(),
             stop_ids: set[int] | frozenset[int] = frozenset(), max_len: int | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (which is yielded), ``max_new_tokens``, or ``max_len`` positions."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt (at least a BOS token)")
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    cache = model.new_cache()
    logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]  # prefill: (vocab,)
    n = len(prompt)
    for _ in range(params.max_new_tokens):
        if max_len is not None and n >= max_len:
            return
        tok = sample(logits, params, gen)
        yield tok
        if tok in stop_ids:
            return
        logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)[0, -1]
        n += 1
