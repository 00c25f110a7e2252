"""Property tests: random SamplingParams, prompt lengths and KV budgets never break the engine."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit.engine import SamplingParams
from attnkit.engine.scheduler import Scheduler
from engine_helpers import make_llm, tiny_llama

VOCAB = 64
MODEL = tiny_llama(VOCAB, d_model=32, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=1)
EOS = 3

params_st = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_k=st.integers(0, 80),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
    repetition_penalty=st.floats(0.5, 2.0),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=2),
    max_tokens=st.integers(1, 12),
    ignore_eos=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(0, 3)),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-5, 5), max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.tuples(st.integers(1, 40), params_st), min_size=1, max_size=6),
    num_blocks=st.integers(16, 64),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(8, 64),
    max_num_seqs=st.integers(1, 8),
)
def test_engine_never_crashes_nor_exceeds_budgets(reqs, num_blocks, block_size, budget, max_num_seqs):
    num_blocks = max(num_blocks, -(-60 // block_size) + 2)  # room for the longest request
    llm = make_llm(MODEL, eos_ids={EOS}, block_size=block_size, num_blocks=num_blocks,
                   max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=60)
    real = Scheduler.schedule

    def checked(self):
        batch = real(self)
        assert sum(batch.num_tokens) <= budget and len(self.running) <= max_num_seqs
        assert self.bm.num_free >= 0 and all(n >= 1 for n in batch.num_tokens)
        return batch

    Scheduler.schedule = checked
    try:
        prompts = [[(7 * i + j) % VOCAB for j in range(n)] for i, (n, _) in enumerate(reqs)]
        outs = llm.generate(prompts, [p for _, p in reqs])
    finally:
        Scheduler.schedule = real
    for prompt, (_, p), o in zip(prompts, reqs, outs):
        assert len(o.outputs) == p.n
        for c in o.outputs:
            assert 1 <= len(c.token_ids) <= p.max_tokens
            if c.finish_reason == "length":
                assert len(c.token_ids) == p.max_tokens or len(prompt) + len(c.token_ids) == 60
            else:
                assert c.finish_reason == "stop"
                last = c.token_ids[-1]
                assert (last == EOS and not p.ignore_eos) or last in p.stop_token_ids
            if p.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
            assert all(0 <= t < VOCAB for t in c.token_ids)
    st_ = llm.engine.stats()
    assert st_.free_blocks == st_.num_blocks


@settings(max_examples=60, deadline=None)
@given(params=params_st, seed=st.integers(0, 1000))
def test_sampled_tokens_respect_top_k_and_min_p(params, seed):
    import torch

    from attnkit.engine.sampler import apply_penalties_and_bias, sample
    from attnkit.engine.sequence import Sequence

    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    seqs = [Sequence(str(i), 0, [1, 2, 3], params) for i in range(4)]
    tokens, lps = sample(logits, seqs, {EOS})
    processed = apply_penalties_and_bias(logits.clone(), seqs, {EOS})
    for r, t in enumerate(tokens):
        row = processed[r]
        if params.greedy:
            assert t == int(row.argmax())
            continue
        if 0 < params.top_k < VOCAB:
            assert row[t] >= torch.topk(row, params.top_k).values[-1]
        probs = torch.softmax(row / params.temperature, -1)
        if params.min_p > 0 and params.top_k == 0 and params.top_p == 1.0:
            assert probs[t] >= params.min_p * probs.max() - 1e-6
        assert (lps[r] is not None) == (params.logprobs is not None)
