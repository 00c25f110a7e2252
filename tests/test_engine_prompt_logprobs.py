"""Prompt logprobs (vLLM's ``SamplingParams.prompt_logprobs``): log p(prompt token i | tokens before it) for
every prompt token after the first, with the top alternatives, equal to one full forward's log-softmax —
through chunked prefill, preemption and a prompt already in the prefix cache."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_llm, random_prompts, tiny_llama

from attnkit.engine import SamplingParams
from attnkit.engine.sampling_params import SamplingParamsError

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=2)


def _reference(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)  # (T, vocab)


def _check(model, prompt: list[int], got, k: int) -> None:
    ref = _reference(model, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        d = got[i]
        assert d[prompt[i]] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        top = torch.topk(ref[i - 1], k).indices.tolist()
        assert set(top) <= set(d) and len(d) <= k + 1
        for t in top:
            assert d[t] == pytest.approx(float(ref[i - 1, t]), abs=1e-4)


def test_prompt_logprobs_equal_a_full_forward_through_chunked_prefill(model):
    prompts = random_prompts(6, VOCAB, lo=2, hi=70, seed=5) + [[7]]
    llm = make_llm(model, max_num_batched_tokens=24)  # prompts span several prefill chunks
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4))
    for p, o in zip(prompts, outs):
        _check(model, p, o.prompt_logprobs, 4)
    plain = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=3))[0]
    assert plain.prompt_logprobs is None and plain.token_ids == outs[0].token_ids


def test_a_cached_prefix_is_recomputed_and_preemption_does_not_duplicate(model):
    prompts = random_prompts(5, VOCAB, lo=30, hi=40, seed=8)
    llm = make_llm(model, block_size=4, num_blocks=40)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # the first prompt is now in the prefix cache
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=0, n=2))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        _check(model, p, o.prompt_logprobs, 0)


def test_bad_prompt_logprobs_are_refused():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
