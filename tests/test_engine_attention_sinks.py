"""Attention sinks (StreamingLLM, Xiao et al. 2023): SamplingParams.kv_window keeps the K/V of the first tokens
(whole blocks) and of the recent window, drops the blocks between (BlockManager.slide) and re-rotates the sinks
so that every key's distance to the query is its distance in the cache. A request then runs past the context in
bounded memory.

With one layer a token's K/V depend only on the token and its position, so the engine's cache is exactly what a
full recomputation over the kept tokens computes: sinks and window at positions shift … p. That reference is
exact; without the sinks' re-rotation the logits differ (the test would see it)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_llm, random_prompts, tiny_llama

from attnkit.engine import SamplingParams
from attnkit.engine.sampling_params import SamplingParamsError

VOCAB, BS, W, SINKS = 320, 4, 24, 4


def _shift(p: int, sink_len: int) -> int:
    """Tokens dropped when the query is at position p: the fewest whole blocks that leave it < W + bs keys
    after the sinks (the engine's rule, BlockManager.slide)."""
    d = p - sink_len - BS - W
    return 0 if d < 0 else (d // BS + 1) * BS


@torch.inference_mode()
def _reference_logprobs(model, tokens: list[int], prompt_len: int, rotate_sinks: bool = True) -> list[torch.Tensor]:
    sink_len = -(-SINKS // BS) * BS
    out = []
    for p in range(prompt_len - 1, len(tokens) - 1):  # the query at p predicts token p + 1
        sh = _shift(p, sink_len)
        idx = list(range(sink_len)) + list(range(sink_len + sh, p + 1)) if sh else list(range(p + 1))
        pos = torch.arange(sh, p + 1) if rotate_sinks or not sh else torch.tensor(idx)
        out.append(model(torch.tensor([[tokens[i] for i in idx]]), positions=pos)[0, -1].float().log_softmax(-1))
    return out


def test_one_layer_cache_is_the_recomputation_over_the_kept_tokens():
    model = tiny_llama(VOCAB, n_layers=1)
    llm = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20, max_num_batched_tokens=64, max_model_len=40)
    prompt = random_prompts(1, VOCAB, 20, 20, seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, kv_window=W, attention_sinks=SINKS,
                            logprobs=0)
    out = llm.generate([prompt], params)[0]
    assert len(out.token_ids) == 120 and len(prompt) + 120 > 3 * llm.engine.max_model_len  # far past the context
    tokens = prompt + out.token_ids
    got = torch.tensor([lp[t] for lp, t in zip(out.outputs[0].logprobs, out.token_ids)])
    ref = _reference_logprobs(model, tokens, len(prompt))
    assert [int(r.argmax()) for r in ref] == out.token_ids
    want = torch.stack([r[t] for r, t in zip(ref, out.token_ids)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the sinks at their first positions instead: a different model (the check above can fail)
    unrotated = torch.stack([r[t] for r, t in zip(_reference_logprobs(model, tokens, len(prompt), False),
                                                    out.token_ids)])
    assert (unrotated - want).abs().max() > 1e-4


def test_memory_stays_bounded_and_is_returned():
    model = tiny_llama(VOCAB, n_layers=2)
    llm = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20, max_num_batched_tokens=16, max_model_len=48)
    engine = llm.engine
    engine.add_request(random_prompts(1, VOCAB, 30, 30, seed=6)[0],
                       SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, kv_window=W, attention_sinks=SINKS))
    widest = 0
    while engine.scheduler.has_work():
        engine.step()
        for s in engine.scheduler.running:
            widest = max(widest, len(s.block_table) + len(s.sink_source))
            assert s.kv_shift % BS == 0 and s.num_cached <= SINKS + W + 2 * BS + 16
    assert widest <= 1 + 1 + (W + BS + 16) // BS + 1  # sinks + their source + the window + a step's tokens
    assert engine.block_manager.num_free == engine.block_manager.num_blocks  # every block back in the pool


def test_a_window_never_reached_changes_nothing():
    model = tiny_llama(VOCAB, n_layers=2)
    prompts = random_prompts(4, VOCAB, 5, 30, seed=7)
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    sinks = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0, kv_window=64)
    a = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20).generate(prompts, plain)
    b = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20).generate(prompts, sinks)
    assert [o.outputs[0].logprobs for o in a] == [o.outputs[0].logprobs for o in b]


def test_siblings_preemption_and_prefix_cache_keep_the_blocks_straight():
    """n = 2 siblings share the (already slid) prompt, a small pool preempts and recomputes, a second request
    reuses the prompt's cached blocks; greedy siblings stay equal and every block comes back."""
    model = tiny_llama(VOCAB, n_layers=2)
    llm = make_llm(model, block_size=BS, num_blocks=40, max_num_batched_tokens=16, max_model_len=40)
    prompt = random_prompts(1, VOCAB, 50, 50, seed=8)[0]  # longer than sinks + window: slides during its prefill
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, kv_window=W, attention_sinks=SINKS, n=2)
    outs = llm.generate([prompt, prompt[:30] + [1, 2, 3], prompt], params)
    for o in outs:
        assert len(o.outputs) == 2 and o.outputs[0].token_ids == o.outputs[1].token_ids
        assert len(o.outputs[0].token_ids) == 60
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free == bm.num_blocks and llm.engine.scheduler.num_preemptions > 0 and bm.stats().prefix_hits > 0


def test_what_it_cannot_do_is_refused_by_name():
    with pytest.raises(SamplingParamsError, match="kv_window"):
        SamplingParams(kv_window=0)
    with pytest.raises(SamplingParamsError, match="attention_sinks"):
        SamplingParams(kv_window=8, attention_sinks=-1)
    model = tiny_llama(VOCAB, n_layers=2)
    small = make_llm(model, block_size=BS, num_blocks=8, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="exceeds the KV pool's 32 tokens"):
        small.generate([[1, 2, 3]], SamplingParams(kv_window=W))
    windowed = make_llm(tiny_llama(VOCAB, n_layers=2, sliding_window=8), block_size=BS, kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="sliding windows of their own"):
        windowed.generate([[1, 2, 3]], SamplingParams(kv_window=W))
    spec = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20, speculative="ngram")
    with pytest.raises(ValueError, match="speculative decoding"):
        spec.generate([[1, 2, 3]], SamplingParams(kv_window=W))
