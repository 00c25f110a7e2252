"""Multi-LoRA serving: several PEFT-format LoRA adapters on one base, picked per request and batched in the
same engine step; every output equals the corresponding merged model's (plain greedy decoding)."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_helpers import greedy_reference, make_llm, random_prompts, tiny_llama

from attnkit.engine.lora import MultiLoraLinear, StepAdapters
from attnkit.nn.fused import fuse_for_inference
from attnkit.peft import (
    AdapterLoadError,
    IA3Config,
    LoraConfig,
    PeftModel,
    get_peft_model,
)

VOCAB, N_NEW = 320, 10
ADAPTERS = {  # name → config; different targets, ranks and scalings
    "attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "ffn": LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]),
    "all": LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 5},
                      alpha_pattern={"up_proj": 1.5}),
}


def _base() -> torch.nn.Module:
    return tiny_llama(VOCAB, seed=5)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{name: (directory, merged model)} for three random LoRA adapters saved in PEFT's format."""
    out = {}
    for k, (name, config) in enumerate(ADAPTERS.items()):
        peft = get_peft_model(_base(), config)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in peft.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        directory = tmp_path_factory.mktemp(name)
        peft.save_pretrained(directory)
        merged = PeftModel.from_pretrained(_base(), directory).merge_and_unload().eval()
        out[name] = (directory, merged)
    return out


def _engine(adapters, fuse: bool, **cfg):
    model = _base()
    llm = make_llm(fuse_for_inference(model) if fuse else model, **cfg)
    for name, (directory, _) in adapters.items():
        llm.load_lora(name, directory)
    return llm


def _greedy(n: int = N_NEW):
    from attnkit.engine import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_mixed_batch_equals_each_merged_model(adapters, monkeypatch, fuse):
    seen = []
    real = StepAdapters.set
    monkeypatch.setattr(StepAdapters, "set", lambda self, a, n, d: seen.append(set(a)) or real(self, a, n, d))
    llm = _engine(adapters, fuse, max_num_batched_tokens=256)
    prompts = random_prompts(12, VOCAB, lo=3, hi=40, seed=7)
    names = [None, "attn", "ffn", "all"] * 3
    outs = llm.generate(prompts, _greedy(), lora=names)
    base = _base()
    for prompt, name, out in zip(prompts, names, outs):
        model = base if name is None else adapters[name][1]
        assert out.outputs[0].token_ids == greedy_reference(model, prompt, N_NEW), name
    assert max(len(s) for s in seen) == 4, "the base and all three adapters should share a step"
    # the adapters do change the output (else the equality above proves nothing)
    differs = [llm.generate([prompts[0]], _greedy(), lora=n)[0].outputs[0].token_ids for n in [None, *ADAPTERS]]
    assert len({tuple(d) for d in differs}) == 4


def test_prefix_cache_is_per_adapter(adapters):
    llm = _engine(adapters, True, block_size=4)
    prompt = random_prompts(1, VOCAB, lo=30, hi=30, seed=3)[0]
    stats = llm.engine.stats
    want = {n: greedy_reference(_base() if n is None else adapters[n][1], prompt, N_NEW) for n in (None, "attn")}
    assert llm.generate([prompt], _greedy(), lora=None)[0].outputs[0].token_ids == want[None]
    hits = stats().prefix_hits
    # same tokens, other adapter: the base's blocks must not be reused
    assert llm.generate([prompt], _greedy(), lora="attn")[0].outputs[0].token_ids == want["attn"]
    assert stats().prefix_hits == hits
    # same adapter again: its own blocks are
    assert llm.generate([prompt], _greedy(), lora="attn")[0].outputs[0].token_ids == want["attn"]
    assert stats().prefix_hits > hits
    assert stats().used_blocks == 0


def test_n_completions_and_preemption_keep_the_adapter(adapters):
    from attnkit.engine import SamplingParams

    prompts = random_prompts(6, VOCAB, lo=20, hi=40, seed=11)
    names = ["ffn", "attn", None, "all", "ffn", "attn"]
    want = [greedy_reference(_base() if n is None else adapters[n][1], p, 24) for p, n in zip(prompts, names)]
    small = _engine(adapters, True, block_size=4, num_blocks=40)  # too small for all six at once: preemption
    outs = small.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2), lora=names)
    assert small.engine.scheduler.num_preemptions > 0
    for out, w in zip(outs, want):
        assert [c.token_ids for c in out.outputs] == [w, w]


def test_bad_adapters_and_names_are_refused_and_nothing_half_loads(adapters, tmp_path):
    llm = _engine(adapters, True)
    prompt = [1, 2, 3, 4]
    before = llm.generate([prompt], _greedy(), lora="attn")[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        llm.generate([prompt], _greedy(), lora="nope")
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_lora("attn", adapters["attn"][0])
    with pytest.raises(ValueError, match="adapter name"):
        llm.load_lora("a:b", adapters["attn"][0])
    # an adapter made for a wider model: every shape is checked before any layer changes
    wide = get_peft_model(tiny_llama(VOCAB, d_model=96, n_heads=4, n_kv_heads=2),
                          LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(AdapterLoadError, match="needs A"):
        llm.load_lora("wide", tmp_path / "wide")
    ia3 = get_peft_model(_base(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterLoadError, match="only LoRA"):
        llm.load_lora("ia3", tmp_path / "ia3")
    with pytest.raises(AdapterLoadError, match="missing"):
        llm.load_lora("gone", tmp_path / "nowhere")
    assert llm.engine.lora_names() == list(ADAPTERS)
    assert llm.generate([prompt], _greedy(), lora="attn")[0].outputs[0].token_ids == before
    assert llm.generate([prompt], _greedy())[0].outputs[0].token_ids == greedy_reference(_base(), prompt, N_NEW)


def test_remove_is_refused_while_in_use(adapters):
    llm = _engine(adapters, True)
    rid = llm.engine.add_request([5, 6, 7], _greedy(), lora="ffn")
    with pytest.raises(ValueError, match="in use"):
        llm.engine.remove_lora("ffn")
    llm.engine.abort_request(rid)
    llm.engine.remove_lora("ffn")
    assert "ffn" not in llm.engine.lora_names()
    with pytest.raises(ValueError, match="no LoRA adapter named 'ffn'"):
        llm.generate([[5, 6, 7]], _greedy(), lora="ffn")


@pytest.mark.parametrize("wide", [False, True], ids=["masked", "gathered"])
def test_multi_lora_layer_adds_each_adapters_update_to_its_rows(wide):
    torch.manual_seed(0)
    base = torch.nn.Linear(8 if not wide else 4, 6)
    step = StepAdapters()
    layer = MultiLoraLinear(copy.deepcopy(base), step)
    d = base.in_features
    A1, B1, A2, B2, A3, B3 = torch.randn(2, d), torch.randn(6, 2), torch.randn(1, d), torch.randn(6, 1), \
        torch.randn(1, d), torch.randn(6, 1)
    for a, u in {1: (A1, B1), 2: (A2, B2), 3: (A3, B3)}.items():
        layer.set_update(a, u)
    assert len(layer.columns) == 4 and (len(layer.columns) > d // 2) == wide
    x = torch.randn(1, 5, d)
    step.set([2, 0, 1], [2, 1, 2], x.device)  # rows 0-1 adapter 2, row 2 the base, rows 3-4 adapter 1
    ref = base(x)[0]
    ref[:2] += x[0, :2] @ A2.T @ B2.T
    ref[3:] += x[0, 3:] @ A1.T @ B1.T
    torch.testing.assert_close(layer(x)[0], ref)
    step.set([1, 1], [3, 2], x.device)  # one adapter for every row: its slice only
    assert step.single == 1
    torch.testing.assert_close(layer(x)[0], base(x)[0] + x[0] @ A1.T @ B1.T)
    layer.set_update(1, None)
    torch.testing.assert_close(layer(x)[0], base(x)[0])
    step.set([0, 0], [3, 2], x.device)
    assert step.token_adapter is None
    torch.testing.assert_close(layer(x)[0], base(x)[0])


def test_lora_on_experts_serves_a_mixed_batch_as_the_merged_models(tmp_path):
    """A mixture of experts' adapters on its experts too (each expert's product sees only its routed rows, so each
    row's adapter is looked up among them): a batch mixing the base and the adapter gives each request the merged
    model's greedy tokens; an adapter on the router is refused whole, naming it."""
    from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
    from attnkit.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4,
                      n_experts_per_tok=2, max_seq_len=128)

    def base():
        torch.manual_seed(0)
        return Llama(cfg).eval()

    for name, targets in (("experts", ["q_proj", "gate_proj", "down_proj"]), ("router", ["router"])):
        peft = get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in peft.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        peft.save_pretrained(tmp_path / name)
    merged = PeftModel.from_pretrained(base(), tmp_path / "experts").merge_and_unload().eval()
    for wide in (False, True):  # the masked product, and (stacked rank past in/2) each adapter's rows gathered
        engine = LLMEngine(base(), config=EngineConfig(block_size=4))
        with pytest.raises(AdapterLoadError, match="router"):
            engine.add_lora("router", tmp_path / "router")
        engine.add_lora("experts", tmp_path / "experts")
        if wide:
            for m in engine.model.modules():
                if isinstance(m, MultiLoraLinear):
                    m.columns = m.columns + (99,) * 64  # columns of an absent adapter: only the width changes
                    m.A = torch.cat([m.A, torch.zeros(64, m.A.shape[1])])
                    m.B = torch.cat([m.B, torch.zeros(m.B.shape[0], 64)], 1)
                    m.spans = dict(m.spans)
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14]]
        names = ["experts", None, "experts"]
        ids = [engine.add_request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), lora=n)
               for p, n in zip(prompts, names)]
        got = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    got[o.request_id] = list(o.token_ids)
        for rid, p, n in zip(ids, prompts, names):
            assert got[rid] == greedy_reference(merged if n else base(), p, 6), (wide, n)
    assert any("experts" in n for n, m in engine.model.named_modules() if isinstance(m, MultiLoraLinear))
    assert greedy_reference(merged, prompts[0], 6) != greedy_reference(base(), prompts[0], 6)  # the adapter matters
