"""EngineConfig.kv_cache_dtype: a float16 K/V pool (llama.cpp's f16 KV cache, vLLM's kv_cache_dtype).

Every read path of the pool (the C kernel, the bmm fallback, the compiled path's function) computes on
the halves widened to float32; the engine's outputs stay those of float32 K/V up to that rounding, with
half the bytes per block. ``LLM()`` (the gguf path) stores float16 K/V by default.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_reference, make_llm, random_prompts, tiny_llama

from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
from attnkit.engine import paged_attention as pa
from attnkit.engine.model_runner import ModelRunner
from attnkit.engine.options import InferenceOptions
from attnkit.kernels import library

VOCAB = 320
needs_kernel = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB)


def _paged_inputs(hd: int, n_kv: int = 2, g: int = 3, bs: int = 4, num_blocks: int = 40, seed: int = 0):
    """Random float16 pools, block tables, mixed lengths and sliding-window starts (some > 0)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_kv, num_blocks, bs, hd, generator=gen).half()
    v = torch.randn(n_kv, num_blocks, bs, hd, generator=gen).half()
    lens = torch.tensor([1, 7, 16, 29, 5])
    starts = torch.tensor([0, 0, 3, 20, 4])
    nb = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:nb] for _ in lens])
    q = torch.randn(n_kv * g, len(lens), hd, generator=gen)
    return q, k, v, tables, lens, starts


def _bias(tables: torch.Tensor, lens: torch.Tensor, starts: torch.Tensor, bs: int) -> torch.Tensor:
    j = torch.arange(tables.shape[1] * bs)[None, :]
    visible = (j >= starts[:, None]) & (j < lens[:, None])
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """(n_kv, num_blocks, bs, hd) through (B, nb) → (n_kv, B, nb·bs, hd)."""
    n_kv, hd = pool.shape[0], pool.shape[-1]
    return pool[:, tables].reshape(n_kv, tables.shape[0], -1, hd)


@needs_kernel
@pytest.mark.parametrize("hd", [64, 128, 20])  # 64, 128: unrolled variants; 20: generic, with the scalar tail of F16C
def test_c_kernel_on_float16_pools_matches_the_float32_reference(hd):
    q, k, v, tables, lens, starts = _paged_inputs(hd)
    bias = _bias(tables, lens, starts, k.shape[2])
    ref = pa.decode_attention(q, _gather(k.float(), tables), _gather(v.float(), tables), bias)
    out = pa.paged_decode_attention_native(q, k, v, tables, lens, starts)
    assert out is not None and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # the same float32 arithmetic as the float32 kernel on the widened pool
    assert torch.equal(out, pa.paged_decode_attention_native(q, k.float(), v.float(), tables, lens, starts))


@pytest.mark.parametrize("path", ["bmm", "compiled-function"])
def test_torch_read_paths_widen_float16_pools(path):
    q, k, v, tables, lens, starts = _paged_inputs(32, seed=1)
    bias = _bias(tables, lens, starts, k.shape[2])
    ref = pa.decode_attention(q, _gather(k.float(), tables), _gather(v.float(), tables), bias)
    if path == "bmm":
        out = pa.decode_attention(q, _gather(k, tables), _gather(v, tables), bias)
    else:  # the function torch.compile compiles, run eagerly
        out = pa.paged_decode_attention(q, k, v, tables, bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _step_logits(llm, prompts, params) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy outputs of the prompts and the logits of every engine step."""
    runner, steps = llm.engine.runner, []
    run = runner.run

    def spy(batch):
        logits, rows = run(batch)
        steps.append(logits.clone())
        return logits, rows

    runner.run = spy
    try:
        return [o.token_ids for o in llm.generate(prompts, params)], steps
    finally:
        del runner.run


def test_float16_engine_matches_the_float32_engine(model, monkeypatch):
    prompts = random_prompts(12, VOCAB, 1, 70, seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    pool_dtypes = []  # of the C kernel's calls
    native = pa.paged_decode_attention_native

    def spy(q, k_pool, *args, **kw):
        pool_dtypes.append(k_pool.dtype)
        return native(q, k_pool, *args, **kw)

    monkeypatch.setattr(pa, "paged_decode_attention_native", spy)
    half = make_llm(model, block_size=4, max_num_batched_tokens=128, kv_cache_dtype="float16")
    full = make_llm(model, block_size=4, max_num_batched_tokens=128)
    assert half.engine.runner.k_pool.dtype == half.engine.runner.v_pool.dtype == torch.float16
    out16, logits16 = _step_logits(half, prompts, params)
    assert set(pool_dtypes) == ({torch.float16} if library() is not None else set())
    out32, logits32 = _step_logits(full, prompts, params)
    assert out16 == out32 == [greedy_reference(model, p, 12) for p in prompts]
    assert len(logits16) == len(logits32) > 12  # prefill chunks, mixed steps and decode-only steps
    rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(logits16, logits32)]
    assert 0 < max(rel) < 1e-4, rel  # K/V really rounded (to 11 significant bits), the logits barely moved


def test_prefix_hits_and_preemption_keep_float16_outputs(model):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    shared = random_prompts(1, VOCAB, 40, 40, seed=3)[0]
    prompts = [shared + tail for tail in ([1, 2, 3], [7, 8], [9])]
    cold = make_llm(model, block_size=4, enable_prefix_caching=False, kv_cache_dtype="float16")
    warm = make_llm(model, block_size=4, kv_cache_dtype="float16")
    expected = [o.token_ids for o in cold.generate(prompts, params)]
    assert [warm.generate(p, params)[0].token_ids for p in prompts] == expected  # one by one: later ones hit
    assert warm.engine.stats().prefix_hits >= 2 * 10

    prompts = random_prompts(12, VOCAB, 10, 60, seed=5)
    roomy = make_llm(model, block_size=4, kv_cache_dtype="float16").generate(prompts, params)
    small = make_llm(model, block_size=4, num_blocks=24, max_num_batched_tokens=48, kv_cache_dtype="float16")
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]


def test_float16_pool_takes_half_the_bytes(model):
    f32 = ModelRunner.bytes_per_block(model, 16)
    assert ModelRunner.bytes_per_block(model, 16, torch.float16) * 2 == f32
    assert ModelRunner.bytes_per_block(model, 16, torch.float32) == f32
    budget = 64 * f32
    full = LLMEngine(model, config=EngineConfig(kv_cache_bytes=budget))
    half = LLMEngine(model, config=EngineConfig(kv_cache_bytes=budget, kv_cache_dtype="float16"))
    assert full.block_manager.num_blocks == 64 and half.block_manager.num_blocks == 128
    assert half.runner.k_pool.dtype == torch.float16 and full.runner.k_pool.dtype == torch.float32
    assert half.runner.k_pool.nbytes + half.runner.v_pool.nbytes == budget
    bf16 = LLMEngine(model, config=EngineConfig(num_blocks=8, kv_cache_dtype="bfloat16"))
    assert bf16.runner.k_pool.dtype == torch.bfloat16


def test_bad_kv_cache_dtype_is_named(model):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'float16', 'bfloat16', 'float32', 'q8_0', 'q4_0', "
                       r"'int8', 'int4'\]"):
        LLMEngine(model, config=EngineConfig(kv_cache_dtype="fp8"))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        InferenceOptions(kv_cache_dtype="half")


def test_inference_options_resolve_auto():
    assert InferenceOptions().engine_kv_cache_dtype() == "float16"  # gguf: as llama.cpp
    assert InferenceOptions(quantize=None).engine_kv_cache_dtype() == "float32"
    assert InferenceOptions(quantize=None, dtype="bfloat16").engine_kv_cache_dtype() == "bfloat16"
    assert InferenceOptions(quantize="int8").engine_kv_cache_dtype() == "float32"
    assert InferenceOptions(kv_cache_dtype="float32").engine_kv_cache_dtype() == "float32"


def test_default_llm_stores_float16_and_answers_as_float32():
    from engine_helpers import skip_module_without_default_model

    skip_module_without_default_model()
    from attnkit import LLM

    # Rounding K/V to float16 moves the logits by about as much as summing in another order does (the 8-bit
    # activations of the gguf path amplify both), so the two greedy paths may part where two candidates nearly
    # tie (this prompt's first token is one: logits 25.36 vs 25.31). So the test scores texts teacher-forced:
    # every token of a reply gets the same logprob from a float16 pool as from a float32 one, and each token
    # of the float16 run's greedy reply is, under float32 K/V, the best token or within a hair of it. Prefill
    # products in float32: bf16 ones (matmul_dtype "auto" on bf16 hardware) add noise of their own (~0.04 nats
    # a token, KL 0.0014: tests/test_quant_quality.py) that would hide the K/V rounding measured here — and so do
    # the 8-bit activations of the integer kernel, which a short prompt's rows take (SHORT_PROMPT: the system
    # message makes the prompt long enough) and, on machines without bf16 hardware, every prompt row of an
    # interleaved or K-quant layer (dense_for_prompts): here every layer but the head takes the dense product.
    from attnkit.quant.native import GGUFBlockLinear
    from attnkit.quant.row_kernel import SHORT_PROMPT

    def dense_prompts(llm):
        head = llm.engine.model.output_head
        for m in llm.engine.model.modules():
            if isinstance(m, GGUFBlockLinear) and m is not head:
                m.dense_for_prompts = True
        return llm

    conv = [{"role": "system", "content": "You are a helpful assistant. Answer questions about geography briefly, "
                                          "in one sentence, and name the country when you name a city. " * 2},
            {"role": "user", "content": "What is the capital of France?"}]
    half = dense_prompts(LLM(matmul_dtype="float32"))
    assert half.engine.runner.k_pool.dtype == torch.float16
    prompt = half.render_chat(conv)
    assert len(prompt) > SHORT_PROMPT
    reply16 = half.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    full = dense_prompts(LLM(kv_cache_dtype="float32", matmul_dtype="float32"))
    assert full.engine.runner.k_pool.dtype == torch.float32
    reply32 = full.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    score = SamplingParams(max_tokens=1, prompt_logprobs=1)
    for reply in (reply16, reply32):
        text = prompt + reply
        lp16, lp32 = (llm.generate([text], score)[0].prompt_logprobs[len(prompt):] for llm in (half, full))
        for t, (a, b) in enumerate(zip(lp16, lp32)):
            tok = text[len(prompt) + t]
            assert abs(a[tok] - b[tok]) < 0.1, (t, a, b)
            if reply is reply16:
                assert max(b.values()) - b[tok] < 0.25, (t, b)  # float16's choice: float32's best, or nearly


def test_the_commands_pass_the_kv_cache_dtype(monkeypatch, capsys):
    from engine_helpers import skip_module_without_default_model

    skip_module_without_default_model()
    from attnkit.engine import cli as models_cli
    from attnkit.cli import build_parser, main
    from attnkit.serve.cli import build_from_args

    pools = []  # of the engines `attnkit generate` builds
    make_engine = models_cli._engine

    def spy(*args, **kw):
        engine = make_engine(*args, **kw)
        pools.append(engine.runner.k_pool.dtype)
        return engine

    monkeypatch.setattr(models_cli, "_engine", spy)
    for flags, dtype in (([], torch.float16), (["--kv-cache-dtype", "float32"], torch.float32),
                         (["--quantize", "none"], torch.float32)):
        args = build_parser().parse_args(["serve", "--no-embeddings", "--kv-cache-mb", "16", *flags])
        assert build_from_args(args)[1].runner.k_pool.dtype == dtype, flags
        assert main(["generate", "Hi", "--max-new-tokens", "1", *flags]) == 0
        assert pools.pop() == dtype, flags
    capsys.readouterr()
