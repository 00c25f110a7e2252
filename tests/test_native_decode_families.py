"""The C decode step (kernels/decode_step.c, kernels/moe.c) on the options of today's families: q/k RMSNorm per
head (Qwen3) or over the projection (OLMoE), and sparse mixture-of-experts FFNs (Qwen3-MoE, Mixtral, OLMoE) —
against the eager model on the same GGUF blocks, for one row and for rows that choose different experts; a row's
result in a batch is bit for bit its result alone (batch invariance); and every feature the step does not
implement keeps the model eager, with its reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
from attnkit.engine.lora import MultiLoraLinear, StepAdapters
from attnkit.engine.native_decode import NativeDecoder, why_not
from attnkit.kernels import library
from attnkit.models.llama import Llama, LlamaConfig
from attnkit.nn.fused import fuse_for_inference
from attnkit.nn.norm import RMSNorm
from attnkit.nn.positional import RotaryEmbedding
from attnkit.quant.native import GGUFBlockLinear

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")


def _to_blocks(model: nn.Module, kinds: dict[str, str], router: str) -> None:
    """Every Linear of the layers → GGUFBlockLinear of its weight quantized (kinds: by the layer's name, e.g.
    {"up_proj": "Q6_K"}, default kinds["*"]); the MoE router stays float32 unless ``router`` is a block type."""
    from attnkit.quant.gguf_quantize import quantize_rows

    for parent in list(model.layers.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is not nn.Linear:
                continue
            kind = router if name == "router" else kinds.get(name, kinds["*"])
            if kind == "F32":
                continue
            blocks = torch.from_numpy(quantize_rows(m.weight.detach().numpy(), kind))
            setattr(parent, name, GGUFBlockLinear(blocks, kind, m.in_features))


def _model(kinds: dict[str, str] | None = None, router: str = "F32", fuse: str = "all", seed: int = 0, d: int = 64,
           ff: int = 64, **cfg) -> Llama:
    torch.manual_seed(seed)
    c = dict(vocab_size=200, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=2 * ff, max_seq_len=512,
             norm_eps=1e-6)
    c.update(cfg)
    if c.get("n_experts"):
        c.setdefault("moe_d_ff", ff)
    model = Llama(LlamaConfig(**c)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(20)  # sharper logits
        for m in model.modules():  # norms whose weights matter
            if type(m).__name__ == "RMSNorm":
                m.weight.normal_(1.0, 0.3)
    _to_blocks(model, kinds or {"*": "Q8_0"}, router)
    from attnkit.quant.gguf_quantize import quantize_rows

    # a GGUF head, as the files have: its integer kernel is batch invariant too (a float head's BLAS product is not)
    model.output_head = GGUFBlockLinear(torch.from_numpy(quantize_rows(model.lm_head.weight.detach().numpy(), "Q8_0")),
                                        "Q8_0", d)
    if fuse == "all":
        return fuse_for_inference(model)
    for layer in model.layers:  # the experts' gate/up stay apart (the C step takes them as two parts)
        layer.self_attn.fuse()
    return model


def _run(model: Llama, prompts: list[list[int]], steps: int = 12, check_eager: bool = True, engines: list | None = None,
         loras: dict | None = None, lora_of: list | None = None, **engine_kw):
    """Greedy decode through the engine; at each decode-only step also the eager step on the same batch.
    Returns [(native logits, eager logits or None, request ids of the rows)]; the engine is appended to ``engines``.
    ``loras``: LoRA adapters to serve ({name: PEFT directory}); ``lora_of``: each prompt's adapter name or None."""
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=4 << 20, **engine_kw))
    if engines is not None:
        engines.append(engine)
    for name, directory in (loras or {}).items():
        engine.add_lora(name, directory)
    lora_of = lora_of or [None] * len(prompts)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), lora=name)
           for p, name in zip(prompts, lora_of)]
    runner, out = engine.runner, []
    from attnkit.engine.sampler import sample

    for _ in range(steps + 2):
        batch = engine.scheduler.schedule()
        if not batch.seqs:
            break
        decode = all(n == 1 for n in batch.num_tokens)
        eager = None
        if decode and check_eager:
            runner.native = False
            eager, _ = runner.run(batch)
            runner.native = None
        logits, rows = runner.run(batch)
        if decode:
            assert isinstance(runner.native, NativeDecoder), runner.native_reason
            out.append((logits, eager, [ids.index(s.request_id) for s in batch.seqs]))
        engine.scheduler.computed(batch)
        seqs = [batch.seqs[r] for r in rows]
        for s, t in zip(seqs, sample(logits, seqs, engine.eos_ids)[0]):
            s.append(t)
    return out


def _assert_like_eager(steps) -> None:
    rows = same = 0
    for native, eager, _ in steps:
        diff = (native - eager).abs().amax(-1)
        # a rounding difference may move one activation across an 8-bit rounding boundary (≈ the quantization
        # noise, < 0.1 here); a different expert, head norm or anything else would be far larger
        assert diff.max() < 0.1, diff
        rows += len(diff)
        same += int((diff < 1e-4).sum())
    assert rows and same >= 0.9 * rows, (same, rows)


PROMPTS3 = [[5, 17, 99, 3, 42, 7, 8], [150, 2], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73]]


@pytest.fixture(autouse=True)
def _integer_kernel_everywhere(monkeypatch):
    # the eager step on the same integer kernel for every row count (it would take a dense product above 8)
    monkeypatch.setattr(GGUFBlockLinear, "kernel_max_rows", 64)


GEMMA3 = dict(norm_offset=1.0, post_norms=True, embed_scale=8.0, act="gelu_tanh", qk_norm="head", head_dim=32,
              attn_scale=32 ** -0.5 * 0.9, rope_theta=1e6, rope_local_theta=1e4, layer_windows=[5, None, 5])


@pytest.mark.parametrize("variant", [
    dict(GEMMA3, n_layers=3),  # Gemma 3: (1 + γ) and sandwich norms, GeGLU, q/k norms, its scale, local/global layers
    dict(GEMMA3, n_layers=3, free_window_kv=False),  # the windows over one block table: two views of it
    dict(GEMMA3, n_layers=3, attn_softcap=3.0, final_softcap=5.0, qk_norm=None),  # Gemma 2: soft-capped scores
    dict(partial_rotary=0.5, head_dim=32),  # Phi-4-mini: RoPE on part of each head
    dict(sliding_window=6),  # Mistral: one window for all layers
])
def test_gemma_phi4_and_windowed_layers_decode_as_the_eager_model(variant):
    variant = dict(variant)
    free = variant.pop("free_window_kv", True)
    model = _model(**variant)
    assert why_not(model, torch.empty(1, 1, 1, 4, 32)) is None
    for layer in model.layers:  # γ of the (1 + γ) norms near 0, as trained Gemma checkpoints have them
        for m in layer.modules():
            if isinstance(m, RMSNorm) and m.offset:
                m.weight.data.normal_(0.0, 0.3)
    engines: list = []
    _assert_like_eager(_run(model, PROMPTS3, engines=engines, free_window_kv=free))
    runner = engines[0].runner
    # Gemma 3's local and global layers read two views (two block tables, or two windows of one)
    assert len(runner.meta_keys) == (2 if "layer_windows" in variant else 1)
    assert sorted(set(runner.native.layer_views)) == list(range(len(runner.meta_keys)))


def test_lora_adapters_decode_in_the_c_step_as_eagerly(tmp_path):
    """Served LoRA adapters (HF PEFT's format; attention and FFN targets, two ranks) in the C step, each row with its
    own adapter or none in one batch: logits as the eager engine's (MultiLoraLinear) on the same blocks; and the
    adapters do change them."""
    from attnkit.peft import LoraConfig, get_peft_model

    configs = {"attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
               "ffn": LoraConfig(r=2, lora_alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"])}
    loras = {}
    for k, (name, config) in enumerate(configs.items()):
        torch.manual_seed(0)
        peft = get_peft_model(Llama(LlamaConfig(vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                d_ff=128, max_seq_len=512)), config)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in peft.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        peft.save_pretrained(tmp_path / name)
        loras[name] = tmp_path / name
    prompts = PROMPTS3 + [[9, 8, 7, 6]]
    engines: list = []
    steps = _run(_model(), prompts, loras=loras, lora_of=[None, "attn", "ffn", "attn"], engines=engines)
    _assert_like_eager(steps)
    assert engines[0].runner.lora_step is not None
    base = _run(_model(), prompts, check_eager=False)  # negative control: the same prompts without adapters
    with_lora = steps[-1][0]
    rows = {r: i for i, r in enumerate(steps[-1][2])}
    plain = {r: i for i, r in enumerate(base[-1][2])}
    for r, name in enumerate([None, "attn", "ffn", "attn"]):
        diff = (with_lora[rows[r]] - base[-1][0][plain[r]]).abs().max()
        assert (diff > 1e-2) if name else (diff < 1e-4), (r, name, diff)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_decodes_as_the_eager_model(qk_norm):
    model = _model(qk_norm=qk_norm, head_dim=32)  # Qwen3: head_dim ≠ d_model / n_heads
    assert why_not(model, torch.empty(1, 1, 1, 4, 32)) is None
    _assert_like_eager(_run(model, PROMPTS3))


def _chosen_experts(model: Llama) -> list[torch.Tensor]:
    """Record the experts layer 0's router chooses for each row of each eager call."""
    seen: list[torch.Tensor] = []
    ffn = model.layers[0].ffn
    ffn.register_forward_pre_hook(lambda m, args: seen.append(m.route(args[0].reshape(-1, args[0].shape[-1]))[0]))
    return seen


@pytest.mark.parametrize("variant", [
    dict(),  # Qwen3-MoE: head q/k norm, renormalised top-k, float32 router, fused gate/up
    dict(norm_topk_prob=False, qk_norm="full", router="Q8_0"),  # OLMoE, with a GGUF router
    dict(fuse="experts apart", kinds={"*": "Q4_0", "down_proj": "Q8_0"}),  # Mixtral-like, gate/up as two parts
])
def test_moe_decodes_as_the_eager_model(variant):
    v = dict(variant)
    kw = dict(n_experts=8, n_experts_per_tok=2, qk_norm=v.pop("qk_norm", "head"), **v)
    model = _model(**kw)
    seen = _chosen_experts(model)
    _assert_like_eager(_run(model, [PROMPTS3[0]]))  # B = 1
    seen.clear()
    steps = _run(model, PROMPTS3)  # B = 3
    _assert_like_eager(steps)
    decode_routes = [c for c in seen if len(c) == 3]
    assert decode_routes and any(len({tuple(sorted(r.tolist())) for r in c}) == 3 for c in decode_routes), decode_routes


def test_moe_k_quants_with_mixed_parts_decode_as_the_eager_model():
    # Q4_K gate with a Q6_K up: each expert's fused gate/up is two parts (nn.fused.ConcatLinear); top-4 of 8
    model = _model(kinds={"*": "Q4_K", "up_proj": "Q6_K"}, d=256, ff=256, n_heads=4, n_kv_heads=2, n_experts=8,
                   n_experts_per_tok=4, qk_norm="head")
    assert type(model.layers[0].ffn.experts[0].gate_up_proj).__name__ == "ConcatLinear"
    _assert_like_eager(_run(model, PROMPTS3, steps=6))


def test_moe_rows_are_batch_invariant():
    """A sequence's logits are bit for bit the same decoded alone and beside rows that choose other experts."""
    model = _model(n_experts=8, n_experts_per_tok=2, qk_norm="head")
    alone = [lg[0] for lg, _, _ in _run(model, [PROMPTS3[0]], check_eager=False)]
    batch = _run(model, PROMPTS3, check_eager=False)
    together = [lg[rows.index(0)] for lg, _, rows in batch if 0 in rows]
    assert len(alone) == len(together) > 5
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def _prompt_logits(model: Llama, prompts: list[list[int]], eager: bool = False) -> list[torch.Tensor]:
    """Each prompt's first-token logits from one engine step over all of them (``eager``: without the C step)."""
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)) for p in prompts]
    if eager:
        engine.runner.native = False
    batch = engine.scheduler.schedule()
    assert sorted(batch.num_tokens) == sorted(map(len, prompts))  # every prompt whole in this step
    logits, rows = engine.runner.run(batch)
    got = {ids.index(batch.seqs[r].request_id): logits[i] for i, r in enumerate(rows)}
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("variant", [
    dict(),  # Qwen3-MoE-like: float32 router, fused gate/up
    dict(norm_topk_prob=False, qk_norm="full", router="Q8_0"),  # OLMoE-like, a GGUF router
    dict(fuse="experts apart", kinds={"*": "Q4_0", "down_proj": "Q8_0"}),  # Mixtral-like, gate/up as two parts
])
def test_moe_prompt_rows_take_the_c_moe_and_are_batch_invariant(monkeypatch, variant):
    """A prompt's MoE layers run by the C step's function (one call a layer, the rows routed in C), bit for bit the
    same alone and beside other prompts, and within the integer kernels' rounding of the eager grouped products."""
    v = dict(variant)
    model = _model(n_experts=8, n_experts_per_tok=2, qk_norm=v.pop("qk_norm", "head"), **v)
    calls: list[int] = []
    moe_rows = NativeDecoder.moe_rows
    monkeypatch.setattr(NativeDecoder, "moe_rows", lambda self, f, x: calls.append(len(x)) or moe_rows(self, f, x))
    alone = _prompt_logits(model, [PROMPTS3[2]])[0]
    assert calls == [13, 13]  # both layers, the prompt's 13 rows
    together = _prompt_logits(model, PROMPTS3)
    assert torch.equal(alone, together[2])
    calls.clear()
    eager = _prompt_logits(model, PROMPTS3, eager=True)
    assert not calls
    for a, b in zip(together, eager):
        assert (a - b).abs().max() < 0.1


def test_moe_threads_split_every_expert_task_once():
    """The threads take contiguous runs of the expert tasks (moe.c's split): 1, 3 and 5 threads on the same rows —
    teams larger than some layers' task counts — give the same logits bit for bit."""
    model = _model(n_experts=8, n_experts_per_tok=2, qk_norm="head")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 3, 5):
            torch.set_num_threads(n)
            runs.append([lg for lg, _, _ in _run(model, PROMPTS3, steps=4, check_eager=False)])
    finally:
        torch.set_num_threads(threads)
    assert len(runs[0]) >= 4
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("change,reason", [
    (lambda m: setattr(m.layers[0], "post_ffn_norm", RMSNorm(64, eps=1e-3)), "RMSNorm"),
    (lambda m: setattr(m.layers[0].self_attn.k_norm, "weight", nn.Parameter(torch.ones(16).half())), "q/k norms"),
    (lambda m: setattr(m.layers[0].ffn.experts[3], "act", torch.nn.functional.gelu), "expert 3"),
    (lambda m: setattr(m.layers[0].ffn, "router", m.layers[0].ffn.router.half()), "router"),
    (lambda m: setattr(m.layers[1].ffn.experts[0].down_proj, "bias", torch.zeros(64)), "expert 0"),
    (lambda m: setattr(m, "rotary_local", RotaryEmbedding(16, rotary_dim=8)), "another part"),
    (lambda m: setattr(m.layers[1].ffn.experts[2], "down_proj",
                       MultiLoraLinear(m.layers[1].ffn.experts[2].down_proj, StepAdapters())), "LoRA adapters on the experts"),
])
def test_what_the_step_does_not_implement_stays_eager(change, reason):
    model = _model(n_experts=4, n_experts_per_tok=2, qk_norm="head")
    pool = torch.empty(1, 1, 1, 4, 16)
    assert why_not(model, pool) is None
    change(model)
    got = why_not(model, pool)
    assert got is not None and reason in got, got
