"""Speculative decoding (issue 17): every proposer's output equals the plain engine's — greedy tokens, seeded
samples, logprobs, stop strings, n, grammars, LoRA — through chunked prefill, prefix caching and preemption; and
at temperature 1 the emitted tokens follow the target's distribution (chi-square over many seeds)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from engine_helpers import greedy_reference, make_llm, random_prompts, skip_module_without_default_model, tiny_llama

from attnkit.engine import LLM, EngineConfig, SamplingParams, StructuredOutputs
from attnkit.engine.proposers import NgramProposer, first_layers
from attnkit.engine.sequence import Sequence
from attnkit.engine.speculative import PROBE_EVERY, PROBE_MAX, SpecController, SpeculativeConfig, StepCosts


def _always(method: str = "ngram", k: int = 4, **kw) -> SpeculativeConfig:
    """Speculation on every step (the adaptive controller would often, rightly, propose nothing on this CPU)."""
    return SpeculativeConfig(method, k, adaptive=False, **kw)


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


# -- units ---------------------------------------------------------------------------------------------------------
def test_parse_and_bad_configs():
    assert SpeculativeConfig.parse(None) is None
    assert SpeculativeConfig.parse("ngram", 3).num_speculative_tokens == 3
    assert SpeculativeConfig.parse("draft:/x/y").draft_model == "/x/y"
    assert SpeculativeConfig.parse("layerskip:6").draft_layers == 6
    for bad, what in [("medusa", "must be one of"), ("draft", "needs the draft model"), ("layerskip:x", "number"),
                      ("ngram:3", "no argument")]:
        with pytest.raises(ValueError, match=what):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)


def test_ngram_lookup_takes_the_longest_recent_match():
    p = NgramProposer(1, 3)
    seq = Sequence("r", 0, [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7], SamplingParams())
    assert p.lookup(seq, 3) == [2, 6, 7]  # suffix "6 7" last seen before the end at 6 7 → 2
    seq.append(2)  # "7 2": seen once → the tokens after it
    assert p.lookup(seq, 2) == [6, 7]
    assert p.lookup(Sequence("r", 0, [1, 2, 3], SamplingParams()), 4) == []


def test_controller_speculates_for_one_sequence_and_not_for_a_large_batch():
    """With steps of a + b·rows, a token accepted with probability α is worth proposing while α^i beats the step's
    tokens per second: one sequence with α = 0.9 gets drafts; 64 sequences at α = 0.5 get none."""
    c = SpecController(SpeculativeConfig("ngram", 8), NgramProposer())
    for rows in [1, 2, 4, 8] * 4:
        c.target.add(rows, 0.010 + 0.001 * rows)
    assert c.target.a == pytest.approx(0.010) and c.target.b == pytest.approx(0.001)
    hot = Sequence("a", 0, [1], SamplingParams())
    hot.spec_acc, hot.spec_rej = 9.0, 1.0
    assert c.plan([hot], [8], 0)[0] >= 4
    cold = [Sequence(str(i), 0, [1], SamplingParams()) for i in range(64)]
    for s in cold:
        s.spec_acc = s.spec_rej = 1.0
    assert sum(c.plan(cold, [8] * 64, 0)) == 0
    for _ in range(PROBE_EVERY - 1):
        assert sum(c.plan(cold, [8] * 64, 0)) == 0
    assert c.plan(cold, [8] * 64, 0) == [1] * 64  # then each probes with one draft: its α is measured again
    for s in cold:  # every probe fails: the next comes twice as late, and so on up to PROBE_MAX
        c.record(s, 1, 0, 1)
    for _ in range(2 * PROBE_EVERY):
        assert sum(c.plan(cold, [8] * 64, 0)) == 0
    assert c.plan(cold, [8] * 64, 0) == [1] * 64
    for _ in range(8):
        c.record(cold[0], 1, 0, 1)
    assert cold[0].spec_probe_every == PROBE_MAX
    c.record(cold[0], 1, 1, 2)  # an accepted draft: back to probing every PROBE_EVERY steps
    assert cold[0].spec_probe_every == PROBE_EVERY
    costs = StepCosts()
    for _ in range(10):
        costs.add(4, 0.02)  # rows never varied: the prior's split
    assert costs.a > 0 and costs.b == pytest.approx(costs.a * costs.prior_ratio)


# -- exactness on tiny float models ---------------------------------------------------------------------------------
VOCAB = 320


def _loopy_prompts(n: int, seed: int = 3) -> list[list[int]]:
    """Prompts that repeat segments (prompt lookup finds them) mixed with random ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seg = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))]
        out.append(seg * rng.randint(2, 5) if i % 3 else [rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))])
    return out


@pytest.mark.parametrize("method", ["ngram", "draft", "layerskip"])
def test_greedy_equals_the_reference_with_preemption_chunking_and_prefix_cache(method):
    model = tiny_llama(VOCAB, n_layers=4)
    prompts = _loopy_prompts(12) + _loopy_prompts(4)[:4]  # the last four repeat earlier prompts: prefix-cache hits
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    draft = first_layers(tiny_llama(VOCAB, n_layers=4), 2) if method == "draft" else None  # its own weights
    spec = _always(method, 4, **({"draft_layers": 2} if method == "layerskip" else {}))
    # few blocks and a small step budget: sequences are preempted and prompts chunked while others verify drafts
    llm = LLM.from_model(model, None, EngineConfig(num_blocks=40, block_size=4, max_num_batched_tokens=32,
                                                   speculative=spec), eos_ids=set(), draft_model=draft)
    outs = llm.generate(prompts, params)
    assert _tokens(outs) == [greedy_reference(model, p, 24) for p in prompts]
    st = llm.engine.spec.stats
    assert st.proposed > 50 and llm.engine.scheduler.num_preemptions > 0
    if method != "layerskip":  # an untrained half-depth draft agrees rarely: exactness is what counts there
        assert st.accepted > 0
    assert sum(o.metrics.num_draft_tokens for o in outs) == st.proposed
    stats = llm.engine.stats()
    assert stats.used_blocks == 0 and stats.free_blocks == 40  # every rejected draft's block came back


def test_lora_requests_speculate_exactly(tmp_path):
    from attnkit.peft import LoraConfig, PeftModel, get_peft_model

    base = lambda: tiny_llama(VOCAB, seed=5)  # noqa: E731
    peft = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft.save_pretrained(tmp_path)
    merged = PeftModel.from_pretrained(base(), tmp_path).merge_and_unload().eval()
    llm = make_llm(base(), speculative=_always())
    llm.load_lora("a", tmp_path)
    prompts = _loopy_prompts(6, seed=9)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts + prompts, params, lora=["a"] * 6 + [None] * 6)
    want = [greedy_reference(merged, p, 16) for p in prompts] + [greedy_reference(llm.engine.model, p, 16)
                                                                for p in prompts]
    assert _tokens(outs) == want and llm.engine.spec.stats.accepted > 0


@torch.inference_mode()
def _joint_23(model, prompt: list[int], vocab: int) -> torch.Tensor:
    """The model's joint of the 2nd and 3rd sampled tokens, Σ_t1 p(t1) p(t2 | t1) p(t3 | t1, t2), flattened."""
    probs = lambda ctxs: torch.softmax(model(torch.tensor(ctxs))[:, -1].double(), -1)  # noqa: E731
    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(vocab)])
    p3 = probs([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells expecting < 5 pooled) and its p = 0.001 critical
    value (Wilson–Hilferty)."""
    expected = probs * counts.sum()
    keep = expected >= 5
    obs, exp = counts[keep], expected[keep]
    if not bool(keep.all()):
        obs, exp = torch.cat([obs, counts[~keep].sum()[None]]), torch.cat([exp, expected[~keep].sum()[None]])
    dof = len(obs) - 1
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    return float(((obs - exp) ** 2 / exp).sum()), crit


def test_the_distribution_is_the_targets():
    """Temperature 1, a draft model that disagrees often: the second and third emitted tokens (the second verified
    against a draft; the third the bonus after an accepted draft, or sampled at the next step after a rejected one)
    over 4000 seeds fit the target's own joint Σ_t1 p(t1) p(t2 | t1) p(t3 | t1, t2), computed from it directly
    (chi-square)."""
    vocab = 10
    target = tiny_llama(vocab, seed=1, d_model=32, n_layers=2)
    with torch.no_grad():
        target.tok_embeddings.weight.mul_(0.1)  # flat enough that most outcomes are seen
    draft = tiny_llama(vocab, seed=2, d_model=32, n_layers=1)
    prompt = [3, 7, 1]
    llm = LLM.from_model(target, None, EngineConfig(max_num_seqs=256, speculative=_always("draft", 2)), eos_ids=set(),
                         draft_model=draft)
    n = 4000
    outs = llm.generate([prompt] * n, [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=s)
                                       for s in range(n)])
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for o in outs:
        _, t2, t3 = o.outputs[0].token_ids
        counts[t2 * vocab + t3] += 1
    chi2, crit = _chi_square(counts, _joint_23(target, prompt, vocab))
    assert chi2 < crit, f"chi2 {chi2:.1f} (critical {crit:.1f})"
    # the test has power: the same counts against the draft's distribution are rejected
    assert _chi_square(counts, _joint_23(draft, prompt, vocab))[0] > crit
    st = llm.engine.spec.stats
    assert st.proposed >= n // 2 and 0.05 < st.acceptance_rate < 0.95  # drafts verified, accepted and rejected


def test_seeded_and_greedy_outputs_are_the_plain_engines_on_tiny_model():
    model = tiny_llama(VOCAB)
    prompts = random_prompts(10, VOCAB, seed=4) + _loopy_prompts(6)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=i, ignore_eos=True, logprobs=2)
              if i % 2 else SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    plain = make_llm(model).generate(prompts, params)
    spec = make_llm(model, speculative=_always()).generate(prompts, params)
    assert _tokens(spec) == _tokens(plain)
    for a, b in zip(spec, plain):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t] - lb[t]) < 1e-4 for t in la)


def test_bad_setups_are_refused():
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match="needs a draft model"):
        make_llm(model, speculative=_always("draft"))
    with pytest.raises(ValueError, match="vocabulary"):
        LLM.from_model(model, None, EngineConfig(speculative=_always("draft")), draft_model=tiny_llama(100))
    with pytest.raises(ValueError, match="layers must be in"):
        make_llm(model, speculative=_always("layerskip", draft_layers=2))


# -- the default model: its GGUF fast path, the C decode step --------------------------------------------------------
@pytest.fixture(scope="module")
def default_pair():
    skip_module_without_default_model()
    plain = LLM()
    spec = LLM(speculative=_always("ngram", 5))
    return plain, spec


TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "All that glitters is not gold. ")


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.render_chat([{"role": "user", "content": text}])


@pytest.mark.slow
def test_default_model_everything_the_plain_engine_does(default_pair):
    plain, spec = default_pair
    prompts = [_chat(plain, "Repeat exactly: " + TEXT * 2), _chat(plain, "Say hello."),
               "One two three four five six seven eight nine ten eleven", TEXT * 3]
    cases = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=32, stop=["gold", "fox"], logprobs=1),
        SamplingParams(temperature=0.7, seed=3, n=2, max_tokens=24, min_tokens=10),
        SamplingParams(temperature=0, max_tokens=32, repetition_penalty=1.2, presence_penalty=0.3),
    ]
    for params in cases:
        a, b = plain.generate(prompts, params), spec.generate(prompts, params)
        assert _tokens(b) == _tokens(a), params
        assert [c.text for o in b for c in o.outputs] == [c.text for o in a for c in o.outputs]
        assert [c.finish_reason for o in b for c in o.outputs] == [c.finish_reason for o in a for c in o.outputs]
    assert spec.engine.spec.stats.accepted > 10


@pytest.mark.slow
def test_default_model_structured_output_and_batch_invariance(default_pair):
    plain, spec = default_pair
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items":
                                                                                      {"type": "string"}}},
              "required": ["name", "tags"]}
    params = SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutputs(json=schema))
    prompt = _chat(plain, "Give a JSON object with a name and tags for: " + TEXT)
    assert spec.generate(prompt, params)[0].token_ids == plain.generate(prompt, params)[0].token_ids
    # a request alone and inside a batch of others (its drafts verified beside theirs): the same tokens
    reqs = [_chat(plain, f"Repeat exactly: {TEXT[i * 7:]}") for i in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [spec.generate(r, greedy)[0].token_ids for r in reqs]
    assert _tokens(spec.generate(reqs, greedy)) == alone == _tokens(plain.generate(reqs, greedy))
