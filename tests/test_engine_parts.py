"""Engine parts alone: SamplingParams validation, the sampler, the block manager, the scheduler."""

from __future__ import annotations

import pytest
import torch

from attnkit.engine import SamplingParams, SamplingParamsError
from attnkit.engine.block_manager import BlockManager
from attnkit.engine.sampler import plain_greedy, sample
from attnkit.engine.scheduler import QueueFullError, Scheduler
from attnkit.engine.sequence import Sequence


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("seed", 1.5), ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("max_tokens", 0), ("min_tokens", 99),
    ("ignore_eos", 1), ("logprobs", 21), ("logit_bias", {1: 1000.0}), ("logit_bias", {-1: 1.0}),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_sampling_params_normalise():
    p = SamplingParams(stop="x", top_k=-1, logit_bias={3: 2})
    assert p.stop_strings == ("x",) and p.top_k == 0 and p.logit_bias == {3: 2.0} and not p.greedy
    assert SamplingParams(temperature=0).greedy


def _seqs(params: list[SamplingParams], prompt=(1, 2, 3)) -> list[Sequence]:
    return [Sequence(str(i), 0, list(prompt), p) for i, p in enumerate(params)]


def test_sampler_rules():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    greedy = logits.argmax(-1).tolist()
    seqs = _seqs([SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                  SamplingParams(min_p=1.0), SamplingParams(temperature=0, logit_bias={7: 100.0}),
                  SamplingParams(temperature=0, logprobs=3)])
    tokens, lps = sample(logits, seqs)
    assert tokens[:4] == greedy[:4] and tokens[4] == 7 and tokens[5] == greedy[5]
    assert len(lps[5]) == 3 and greedy[5] in lps[5] and lps[0] is None
    assert abs(lps[5][greedy[5]] - float(torch.log_softmax(logits[5], -1).max())) < 1e-5


def test_sampler_penalties_and_min_tokens():
    logits = torch.full((3, 10), 0.1)
    logits[:, 4] = 5.0  # 5 / 100 < 0.1: the repetition penalty demotes it
    s = _seqs([SamplingParams(temperature=0, repetition_penalty=100.0), SamplingParams(temperature=0, min_tokens=2),
               SamplingParams(temperature=0, frequency_penalty=2.0)], prompt=(4,))
    s[2].output_ids = [4, 4, 4]
    tokens, _ = sample(logits, s, eos_ids={4})
    assert tokens[0] != 4 and tokens[1] != 4 and tokens[2] != 4


def test_plain_greedy_rows_are_the_full_samplers_tokens():
    """The engine's fast path (one argmax over a step's rows) applies only where no processor can move the argmax,
    and there gives the sampler's own tokens."""
    torch.manual_seed(1)
    logits = torch.randn(5, 64)
    plain = _seqs([SamplingParams(temperature=0), SamplingParams(temperature=0, max_tokens=3),
                   SamplingParams(temperature=0, min_tokens=1)])
    plain[2].output_ids = [9]  # its min_tokens already met: EOS no longer banned
    assert all(map(plain_greedy, plain))
    assert logits[:3].argmax(-1).tolist() == sample(logits[:3], plain, eos_ids={int(logits[2].argmax())})[0]
    not_plain = _seqs([SamplingParams(), SamplingParams(temperature=0, logit_bias={3: 1.0}),
                       SamplingParams(temperature=0, repetition_penalty=1.1),
                       SamplingParams(temperature=0, presence_penalty=0.5),
                       SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0, min_tokens=1)])
    assert not any(map(plain_greedy, not_plain))


def test_seeded_sampling_ignores_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=123)
    alone = [sample(logits[:1], _seqs([p]))[0][0] for _ in range(1)]
    a = _seqs([p])
    b = _seqs([SamplingParams(), p, SamplingParams(seed=5), SamplingParams(temperature=0)])
    ta = [sample(logits[:1], a)[0][0] for _ in range(5)]
    tb = [sample(torch.stack([logits[1], logits[0], logits[2], logits[3]]), b)[0][1] for _ in range(5)]
    assert ta == tb and ta[0] == alone[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(3000, 1)
    tokens, _ = sample(logits, _seqs([SamplingParams()] * 3000))
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def _seq(tokens, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams())


def test_block_manager_prefix_cache_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10))
    bm.match_prefix(a)
    assert a.num_computed == 0
    bm.allocate(a, 10)
    a.num_computed = 10
    bm.register_full_blocks(a)
    assert bm.num_free == 5
    b = _seq(list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)  # two full blocks are shared
    assert b.num_computed == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = _seq([0, 1, 2, 3, 9, 9, 9, 9, 1])  # same first block only
    bm.match_prefix(c)
    assert c.num_computed == 4
    for s in (a, b, c):
        bm.free_seq(s)
    assert bm.num_free == 8
    d = _seq(range(10))
    bm.match_prefix(d)  # freed blocks keep their hashes
    assert d.num_computed == 8
    st = bm.stats()
    assert st.prefix_hits == 5 and st.used_blocks == 2 and 0 < st.hit_rate < 1


def test_block_manager_verifies_tokens_on_hash_hit(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=2)
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda prev, toks: 42))  # every block collides
    a = _seq([1, 2, 3])
    bm.allocate(a, 3)
    a.num_computed = 3
    bm.register_full_blocks(a)
    b = _seq([5, 6, 7])
    bm.match_prefix(b)
    assert b.num_computed == 0  # same hash, different tokens: a miss


def test_copy_on_write_after_fork():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = _seq([1, 2, 3, 4, 5, 6]), _seq([1, 2, 3, 4, 5, 6])
    bm.allocate(parent, 6)
    parent.num_computed = 6
    bm.fork(parent, child)
    child.num_computed = 5
    copies = bm.allocate(child, 1)  # writes into the shared partial block → copied
    assert copies == [(parent.block_table[1], child.block_table[1])] and child.block_table[0] == parent.block_table[0]
    assert bm.blocks[parent.block_table[1]].ref_count == 1 and bm.blocks[parent.block_table[0]].ref_count == 2
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free == 8


def test_scheduler_budget_fcfs_and_preemption():
    bm = BlockManager(num_blocks=6, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=10, max_waiting=3)
    seqs = [_seq(range(i * 10, i * 10 + 7), str(i)) for i in range(3)]
    sch.add(seqs)
    with pytest.raises(QueueFullError):
        sch.add([_seq([1])])
    b = sch.schedule()
    assert [s.request_id for s in b.seqs] == ["0", "1"] and b.num_tokens == [7, 3]  # chunked prefill of "1"
    sch.computed(b)
    for s in seqs[:1]:
        s.append(0)
    b = sch.schedule()  # decode of 0, rest of 1's prefill, then 2 (no blocks left → waits)
    assert b.num_tokens[:2] == [1, 4] and sum(b.num_tokens) <= 10
    sch.computed(b)
    for s in seqs[:2]:
        s.append(0)
    for _ in range(3):
        for s in sch.running:
            s.append(0)
        b = sch.schedule()
        sch.computed(b)
    assert sch.num_preemptions >= 1 and seqs[0].status.value == "running"  # the latest arrival was preempted


def test_a_prompts_rows_are_of_one_kind_set_by_the_whole_prompts_length():
    """model_runner.row_kind: every chunk of a prompt of at most SHORT_PROMPT tokens is "short-prompt" (the
    integer kernel), of a longer prompt "prompt", whatever the chunk; a generated token's row is "generated"."""
    from attnkit.engine.model_runner import row_kind
    from attnkit.quant.row_kernel import SHORT_PROMPT

    short = Sequence("s", 0, list(range(SHORT_PROMPT)), SamplingParams())
    long_ = Sequence("l", 0, list(range(SHORT_PROMPT + 1)), SamplingParams())
    assert row_kind(short, SHORT_PROMPT) == "short-prompt" and row_kind(long_, 1) == "prompt"
    long_.num_computed = 40
    assert row_kind(long_, SHORT_PROMPT + 1 - 40) == "prompt"  # a later chunk of the long prompt
    short.num_computed = SHORT_PROMPT
    short.append(7)
    assert row_kind(short, 1) == "generated"


def test_a_layer_says_whether_short_and_long_prompts_take_the_same_product():
    """GGUFBlockLinear.prompt_kinds_alike follows forward's choice: both on the integer matrix product, or both on the
    integer kernel, alike; a long prompt on the dense product or a short one kept off the matrix product, not."""
    from attnkit.quant.native import GGUFBlockLinear, random_blocks

    layer = GGUFBlockLinear(random_blocks("Q8_0", 64, 64), "Q8_0", 64)
    for int8, dense, alike in ((True, None, True), (True, True, True), (False, False, True), (False, True, False),
                               (True, False, False)):
        layer._int8_prompts, layer._dense_for_prompts = int8, dense
        assert layer.prompt_kinds_alike() == alike, (int8, dense)


def test_short_and_long_prompts_share_a_pass_when_every_layer_takes_the_same_product(monkeypatch):
    """With batch invariance a step runs one pass per kind of row; a short prompt's rows and a long one's share one
    pass when every layer takes the same product for both (the tokens cannot change), and not otherwise."""
    from attnkit.engine import EngineConfig, LLMEngine
    from attnkit.engine.model_runner import ModelRunner
    from attnkit.quant.native import GGUFBlockLinear, to_blocks
    from attnkit.quant.row_kernel import SHORT_PROMPT

    from engine_helpers import tiny_llama

    model = tiny_llama()
    to_blocks(model, "Q8_0")
    passes: list[list[int]] = []
    run = ModelRunner._run
    monkeypatch.setattr(ModelRunner, "_run", lambda self, b, g=True: passes.append(b.num_tokens) or run(self, b, g))
    prompts = [list(range(1, 10)), list(range(1, SHORT_PROMPT + 20))]  # a short and a long prompt

    def first_step(dense_layer: bool) -> torch.Tensor:
        engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
        layer = next(m for m in model.modules() if isinstance(m, GGUFBlockLinear))
        layer._int8_prompts, layer._dense_for_prompts = (False, True) if dense_layer else (None, None)
        for p in prompts:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        passes.clear()
        logits, _ = engine.runner.run(engine.scheduler.schedule())
        return logits

    alike = all(m.prompt_kinds_alike() for m in model.modules() if isinstance(m, GGUFBlockLinear))
    one = first_step(False)
    assert passes == ([[9, SHORT_PROMPT + 19]] if alike else [[9], [SHORT_PROMPT + 19]])
    monkeypatch.setattr(ModelRunner, "_prompt_kinds_alike", lambda self: False)
    assert torch.equal(first_step(False), one) and len(passes) == 2  # the same logits from two passes
    monkeypatch.undo()
    monkeypatch.setattr(ModelRunner, "_run", lambda self, b, g=True: passes.append(b.num_tokens) or run(self, b, g))
    first_step(True)
    assert passes == [[9], [SHORT_PROMPT + 19]]
