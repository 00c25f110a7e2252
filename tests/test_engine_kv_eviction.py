"""SnapKV (attnkit.engine.kv_eviction): SamplingParams.kv_budget cuts a long prompt's cache, chunk by chunk, to
the keys its last queries weigh most. The scoring is checked on keys built to be attended to; the compaction
exactly (one layer: the engine after compaction computes what the model computes over the kept tokens at their
positions in the cache); memory stays bounded by budget + chunk for a prompt many times the pool."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_llm, random_prompts, tiny_llama

from attnkit.engine import SamplingParams
from attnkit.engine import model_runner as mr
from attnkit.engine.kv_eviction import OBSERVATION, snapkv_keep
from attnkit.engine.sampling_params import SamplingParamsError

VOCAB, BS = 320, 4


def test_keys_the_window_attends_to_are_kept_with_the_window():
    g = torch.Generator().manual_seed(0)
    n_kv, g_heads, hd, L, m, budget = 2, 3, 16, 200, 8, 24  # 16 + 2 clusters of POOL = 7
    k = torch.randn(n_kv, L, hd, generator=g) * 0.1
    q = torch.randn(n_kv * g_heads, m, hd, generator=g) * 0.1
    hot = {0: [17, 90], 1: [5, 140]}  # keys each KV head's queries point at
    for h, js in hot.items():
        for j in js:
            k[h, j] = q[h * g_heads:(h + 1) * g_heads].mean((0, 1)) * 80
    keep = snapkv_keep(q, k, torch.arange(L - m, L), hd ** -0.5, budget)
    assert keep.shape == (n_kv, budget) and (keep.diff(dim=-1) > 0).all()
    for h, js in hot.items():
        kept = set(keep[h].tolist())
        assert set(js) <= kept and set(range(L - m, L)) <= kept
        assert {j + 1 for j in js} <= kept  # max-pooling keeps a hot key's neighbours


def test_one_layer_compaction_is_the_model_over_the_kept_tokens(monkeypatch):
    """Every head keeps the same tokens here (a stand-in scorer): then the reference is the plain model over
    them at their positions in the cache (kept keys re-rotated, StreamingLLM's rule), exact; at their original
    positions it differs (the check can fail)."""
    chosen: list[list[int]] = []

    def keep_even(q_obs, k, q_index, scale, budget):
        L = k.shape[1]
        recent = list(range(L - 8, L))
        idx = sorted(set([j for j in range(0, L, 2) if j not in recent][:budget - len(recent)] + recent))
        chosen.append(idx)
        return torch.tensor(idx)[None].expand(k.shape[0], -1)

    monkeypatch.setattr(mr, "snapkv_keep", keep_even)
    model = tiny_llama(VOCAB, n_layers=1)
    llm = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20, max_num_batched_tokens=64)
    prompt = random_prompts(1, VOCAB, 50, 50, seed=2)[0]
    budget = 24
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, kv_budget=budget,
                                                logprobs=0))[0]
    assert len(chosen) == 1  # one chunk: one compaction, after it
    kept = chosen[0]  # cache indices = positions (nothing dropped before)
    tokens = prompt + out.token_ids
    got = torch.tensor([lp[t] for lp, t in zip(out.outputs[0].logprobs, out.token_ids)])
    with torch.inference_mode():
        want = []
        for p in range(len(prompt) - 1, len(tokens) - 1):
            idx = kept + list(range(len(prompt), p + 1)) if p >= len(prompt) else list(range(p + 1))
            shift = len(prompt) - budget if p >= len(prompt) else 0  # kept keys at their cache index + shift
            pos = torch.arange(shift, shift + len(idx))
            lp = model(torch.tensor([[tokens[i] for i in idx]]), positions=pos)[0, -1].log_softmax(-1)
            want.append(lp[tokens[p + 1]])
    torch.testing.assert_close(got, torch.stack(want).float(), rtol=0, atol=1e-5)
    with torch.inference_mode():
        orig = []
        for p in range(len(prompt), len(tokens) - 1):
            idx = kept + list(range(len(prompt), p + 1))
            lp = model(torch.tensor([[tokens[i] for i in idx]]), positions=torch.tensor(idx))[0, -1].log_softmax(-1)
            orig.append(lp[tokens[p + 1]])
    assert (torch.stack(orig).float() - got[1:]).abs().max() > 1e-4


@pytest.mark.parametrize("kv,stream", [("float32", True), ("q8_0", True), ("float32", False)])
def test_a_prompt_many_times_the_pool_runs_in_bounded_memory(kv, stream):
    """With kv_budget_stream every chunk is compacted (budget + a chunk); without, only when the context would
    overflow (the context's 240 tokens here) and once the prompt is read."""
    model = tiny_llama(VOCAB, n_layers=2, d_model=128, n_heads=4, n_kv_heads=2)  # hd 32: q8_0 rows
    llm = make_llm(model, block_size=BS, num_blocks=60, max_num_batched_tokens=32, kv_cache_dtype=kv)
    engine = llm.engine
    prompt = random_prompts(1, VOCAB, 1000, 1000, seed=3)[0]  # 4× the pool's 240 tokens
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, kv_budget=64,
                                              kv_budget_stream=stream, prompt_logprobs=0))
    widest, outs, after = 0, [], None
    while engine.scheduler.has_work():
        outs += engine.step()
        for s in engine.scheduler.running:
            widest = max(widest, len(s.block_table))
            if s.num_computed == len(s.prompt_ids) + 1 and after is None:
                after = len(s.block_table)  # the first decode: the prompt's cache, compacted
    assert widest <= ((64 + 32) // BS + 1 if stream else 240 // BS) and after == 64 // BS + 1
    final = [o for o in outs if o.finished][0]
    assert len(final.token_ids) == 20 and len(final.prompt_logprobs) == 1000
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_budget_never_reached_changes_nothing():
    model = tiny_llama(VOCAB, n_layers=2)
    prompts = random_prompts(3, VOCAB, 5, 30, seed=7)
    a = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20).generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0))
    b = make_llm(model, block_size=BS, kv_cache_bytes=1 << 20).generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0, kv_budget=64))
    assert [o.outputs[0].logprobs for o in a] == [o.outputs[0].logprobs for o in b]


def test_bad_budgets_are_refused_by_name():
    with pytest.raises(SamplingParamsError, match="kv_budget"):
        SamplingParams(kv_budget=0)
    with pytest.raises(SamplingParamsError, match="not both"):
        SamplingParams(kv_budget=64, kv_window=64)
    small = make_llm(tiny_llama(VOCAB, n_layers=2), block_size=BS, num_blocks=20, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="kv_budget: its cache"):
        small.generate([[1, 2, 3]], SamplingParams(kv_budget=64))
    assert OBSERVATION >= 1
