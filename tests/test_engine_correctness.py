"""The engine against plain greedy decoding on tiny random Llamas: batching, prefix caching,
preemption, n > 1 with copy-on-write, seeds, stops, abort, streaming and the async wrapper."""

from __future__ import annotations

import asyncio

import pytest
import torch

from attnkit.engine import AsyncLLMEngine, SamplingParams, SamplingParamsError
from engine_helpers import GREEDY, greedy_reference, make_llm, random_prompts, tiny_llama

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB)


def test_greedy_same_alone_and_in_a_batch_of_32(model):
    prompts = random_prompts(32, VOCAB, 1, 100)
    params = SamplingParams(temperature=0, max_tokens=10)
    llm = make_llm(model, block_size=4, max_num_batched_tokens=256)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    for i in (0, 7, 31):
        assert make_llm(model, block_size=4).generate(prompts[i], params)[0].token_ids == batched[i]
    assert batched == [greedy_reference(model, p, 10) for p in prompts]
    assert llm.engine.stats().free_blocks == llm.engine.stats().num_blocks


def test_prefix_hit_equals_miss_and_blocks_come_back(model):
    llm = make_llm(model, block_size=4)
    shared = random_prompts(1, VOCAB, 40, 40, seed=3)[0]
    a, b = shared + [1, 2, 3], shared + [7, 8]
    miss = llm.generate(a, GREEDY)[0].token_ids
    hits0 = llm.engine.stats().prefix_hits
    assert llm.generate(a, GREEDY)[0].token_ids == miss
    assert llm.generate(b, GREEDY)[0].token_ids == greedy_reference(model, b, 8)
    assert llm.engine.stats().prefix_hits >= hits0 + 2 * 10
    assert miss == greedy_reference(model, a, 8)


def test_1000_requests_leave_the_pool_as_it_was(model):
    llm = make_llm(model, block_size=4, num_blocks=200, max_num_seqs=64)
    st0 = llm.engine.stats()
    base = random_prompts(8, VOCAB, 5, 20, seed=4)
    prompts = [base[i % 8] + [i % VOCAB] * (i % 3) for i in range(1000)]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, max_tokens=1 + i % 3, n=1 + (i % 5 == 0))
              for i in range(1000)]
    outs = llm.generate(prompts, params)
    assert len(outs) == 1000 and all(o.finished for o in outs)
    st = llm.engine.stats()
    assert st.free_blocks == st0.free_blocks == st.num_blocks and st.prefix_hits > 0
    assert all(b.ref_count == 0 for b in llm.engine.block_manager.blocks)


def test_preemption_keeps_the_outputs(model):
    prompts = random_prompts(12, VOCAB, 10, 60, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24)
    big = make_llm(model, block_size=4).generate(prompts, params)
    small = make_llm(model, block_size=4, num_blocks=24, max_num_batched_tokens=48)  # 96 slots for 12 requests
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in big]
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
    assert small.engine.stats().free_blocks == 24


def test_n_completions_share_the_prompt(model):
    prompt = random_prompts(1, VOCAB, 30, 30, seed=6)[0]
    llm = make_llm(model, block_size=4)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, n=3))[0]
    ref = greedy_reference(model, prompt, 6)
    assert [c.token_ids for c in out.outputs] == [ref] * 3
    sampled = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=6, n=4, seed=0))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1
    assert llm.engine.stats().free_blocks == llm.engine.stats().num_blocks


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    prompts = random_prompts(9, VOCAB, 5, 50, seed=7)
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=1234)
    alone = make_llm(model).generate(prompts[0], p)[0].token_ids
    others = [SamplingParams(temperature=1.2, max_tokens=5 + i) for i in range(8)]
    batch = make_llm(model, block_size=8).generate(prompts[1:5] + [prompts[0]] + prompts[5:], others[:4] + [p] + others[4:])
    assert batch[4].token_ids == alone


def test_top_k_1_is_greedy(model):
    prompts = random_prompts(4, VOCAB, 3, 30, seed=8)
    llm = make_llm(model)
    g = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8))]
    k1 = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=8))]
    assert g == k1


def test_stop_token_ids_eos_and_max_tokens(model):
    prompt = random_prompts(1, VOCAB, 10, 10, seed=9)[0]
    ref = greedy_reference(model, prompt, 12)
    stop_at = next(i for i in range(2, 12) if ref[i] not in ref[:i])
    llm = make_llm(model, eos_ids={ref[stop_at]})
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    assert o.finish_reason == "stop" and o.token_ids == ref[:stop_at + 1] and o.outputs[0].stop_reason is None
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert o.finish_reason == "length" and o.token_ids == ref
    o = make_llm(model).generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[stop_at]]))[0]
    assert o.finish_reason == "stop" and o.outputs[0].stop_reason == ref[stop_at] and len(o.token_ids) == stop_at + 1
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=12))[0]
    assert ref[stop_at] not in o.token_ids and len(o.token_ids) == 12


def test_logprobs_and_timing(model):
    o = make_llm(model).generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, logprobs=2))[0]
    lps = o.outputs[0].logprobs
    assert len(lps) == 5 and all(t in d and 2 <= len(d) <= 3 for t, d in zip(o.token_ids, lps))
    assert all(max(d.values()) == d[t] for t, d in zip(o.token_ids, lps))  # greedy: the top one
    m = o.metrics
    assert m.ttft is not None and m.latency is not None and 0 <= m.ttft <= m.latency


def test_invalid_requests_fail_before_anything_runs(model):
    llm = make_llm(model, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 10, [1] * 64], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[1, 2]], [GREEDY, GREEDY])
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        llm.generate([1, 2], SamplingParams(logit_bias={VOCAB + 5: 1.0}))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([1, VOCAB], GREEDY)
    assert not llm.engine.has_unfinished_requests() and llm.engine.num_steps == 0
    o = llm.generate([1] * 60, SamplingParams(temperature=0, max_tokens=50))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 4  # the context is full


def test_abort_frees_blocks_at_once(model):
    llm = make_llm(model, block_size=4)
    eng = llm.engine
    rid = eng.add_request(random_prompts(1, VOCAB, 50, 50)[0], SamplingParams(max_tokens=100, n=2))
    for _ in range(3):
        eng.step()
    assert eng.stats().used_blocks > 0
    out = eng.abort_request(rid)
    assert out.finished and out.finish_reason == "abort" and eng.stats().used_blocks == 0


def test_stream_grows_to_the_final_output(model):
    llm = make_llm(model)
    prompts = random_prompts(3, VOCAB, 5, 20, seed=10)
    final = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7))
    seen: dict[str, list[int]] = {}
    for out in llm.stream(prompts, SamplingParams(temperature=0, max_tokens=7)):
        prev = seen.get(out.request_id, [])
        assert out.token_ids[:len(prev)] == prev and len(out.token_ids) == len(prev) + 1
        seen[out.request_id] = out.token_ids
    assert sorted(map(tuple, seen.values())) == sorted(tuple(o.token_ids) for o in final)
    it = llm.stream(prompts, SamplingParams(max_tokens=50))
    next(it)
    it.close()  # leaving early aborts
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().used_blocks == 0


def test_async_engine(model):
    llm = make_llm(model)
    eng = AsyncLLMEngine(llm.engine)
    prompts = random_prompts(4, VOCAB, 5, 20, seed=11)
    ref = [greedy_reference(model, p, 6) for p in prompts]

    async def one(p):
        last = None
        async for out in eng.generate(p, SamplingParams(temperature=0, max_tokens=6)):
            last = out
        return last.token_ids

    async def early_exit():
        async for _ in eng.generate(prompts[0], SamplingParams(max_tokens=500)):
            break

    async def main():
        res = await asyncio.gather(*(one(p) for p in prompts))
        await early_exit()
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in eng.generate([1] * 5000, SamplingParams()):
                pass
        await asyncio.sleep(0.05)
        return res

    assert asyncio.run(main()) == ref
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().used_blocks == 0


def test_cpu_and_dtype_of_the_pool(model):
    llm = make_llm(model, num_blocks=10)
    assert llm.engine.runner.k_pool.dtype == torch.float32 and llm.engine.runner.k_pool.device.type == "cpu"


@pytest.mark.parametrize("chunk", [512, 7])  # whole prompts (SDPA's causal mask where no window cuts) and chunks
def test_sliding_window_and_plain_causal_prefill_equal_full_recompute(chunk):
    """Prompts longer and shorter than a Mistral-style window: a first chunk that the window does not cut takes
    SDPA's own causal mask, the others an explicit one; every prompt position's logprob and the greedy tokens
    equal the cache-free model's."""
    for window in (None, 6):
        model = tiny_llama(VOCAB, seed=3, sliding_window=window)
        prompts = random_prompts(6, VOCAB, lo=3, hi=20, seed=5)
        llm = make_llm(model, max_num_batched_tokens=chunk, block_size=4)
        params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
        for p, o in zip(prompts, llm.generate(prompts, params)):
            assert o.token_ids == greedy_reference(model, p, 8), (window, len(p))
            with torch.inference_mode():
                want = torch.log_softmax(model(torch.tensor([p]))[0, :-1].float(), -1)
            got = torch.tensor([lp[t] for lp, t in zip(o.prompt_logprobs[1:], p[1:])])
            torch.testing.assert_close(got, want[torch.arange(len(p) - 1), p[1:]], rtol=1e-4, atol=1e-4)
