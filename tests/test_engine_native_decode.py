"""The decode step in C (attnkit/engine/native_decode.py, kernels/decode_step.c): all layers of a
Llama-family model on GGUF blocks in one call. It computes what the eager model computes: on tiny GGUF
files the logits agree to float rounding; on the default model its error against float32 weights is
the eager path's (both round activations to 8 bits, so rounding differences grow through 30 layers)."""

from __future__ import annotations

import pytest
import torch

from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
from attnkit.engine.native_decode import NativeDecoder
from attnkit.engine.sampler import sample
from attnkit.kernels import library
from attnkit.nn.fused import fuse_for_inference

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")


def _decode_steps(engine: LLMEngine, steps: int, reference=None):
    """Step the engine; at every decode-only step also run the same batch eagerly. Yields
    (native logits, eager logits, float32 reference logits or None)."""
    runner = engine.runner
    for _ in range(steps):
        batch = engine.scheduler.schedule()
        if not batch.seqs:
            return
        if all(n == 1 for n in batch.num_tokens):
            runner.native = False
            eager, _ = runner.run(batch)
            runner.native = None
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref = torch.stack([reference(torch.tensor([s.tokens]))[0, -1] for s in batch.seqs])
        logits, rows = runner.run(batch)
        if all(n == 1 for n in batch.num_tokens):
            assert isinstance(runner.native, NativeDecoder), runner.native_reason
            yield logits, eager, ref
        engine.scheduler.computed(batch)
        seqs = [batch.seqs[r] for r in rows]
        for s, t in zip(seqs, sample(logits, seqs, engine.eos_ids)[0]):
            s.append(t)


@pytest.mark.parametrize("arch,qtype,kv", [("llama", "Q4_1", "auto"), ("qwen2", "Q8_0", "auto"), ("llama", "Q4_1", "q8_0"),
                                           ("qwen2", "Q8_0", "q4_0")])
def test_tiny_gguf_models_decode_as_the_eager_model(tmp_path, arch, qtype, kv, monkeypatch):
    """Also over quantized KV caches: the C step quantizes the rows it stores as the eager path does."""
    pytest.importorskip("transformers")
    from attnkit.quant.native import GGUFBlockLinear

    # the eager step on the same integer kernel for all 12 rows (it would take a dense product above 8)
    monkeypatch.setattr(GGUFBlockLinear, "kernel_max_rows", 64)
    from test_loading_gguf import tiny_hf, write_gguf

    from attnkit.loading.gguf import load_gguf_model

    path = write_gguf(tmp_path / f"{arch}.gguf", tiny_hf(arch), qtype, arch=arch)
    model = fuse_for_inference(load_gguf_model(path, quantize="gguf"))
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=8 << 20, kv_cache_dtype=kv))
    assert engine.runner.kv_format.name == ("float32" if kv == "auto" else kv)
    g = torch.Generator().manual_seed(0)
    # contexts over several blocks, every sequence its own length; 12 of them: more rows than the row-layout
    # kernel's 8, which the C step takes on interleaved blocks (up to 64 rows)
    for n in (3, 9, 17, 1, 30, 5, 12, 2, 7, 20, 4, 11):
        engine.add_request(torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    rows = same = 0
    widest = 0
    for native, eager, _ in _decode_steps(engine, 30):
        if len(native) <= engine.runner.native.max_rows:
            widest = max(widest, len(native))
        diff = (native - eager).abs().amax(-1)  # (B,)
        # a float-rounding difference can move one activation across an 8-bit rounding boundary: then the
        # row differs by about the quantization noise (≈ 0.1 here, 0.1002 seen; over a quantized cache the flip
        # also moves the later layers' K/V codes, ≈ 0.15); anything larger is a real difference
        assert diff.max() < (0.15 if kv == "auto" else 0.25), diff
        rows += len(diff)
        same += int((diff < 1e-4).sum())
    assert rows >= 80 and same >= 0.9 * rows, (same, rows)
    assert widest == min(12, engine.runner.native.max_rows)  # the C step ran the widest batch it may take


def test_default_model_error_against_float32_is_the_eager_paths():
    from engine_helpers import skip_module_without_default_model

    skip_module_without_default_model()
    from attnkit import LLM
    from attnkit.loading import load_causal_lm

    llm = LLM()  # the GGUF blocks, fused: the default path
    f32 = load_causal_lm(None).model
    for t in ("Once upon a time there was", "def fibonacci(n):", "The French revolution began", "Hello"):
        llm.engine.add_request(llm.tokenizer.encode(t), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    err = {"native": [], "eager": []}
    agree = {"native": 0, "eager": 0}
    rows = 0
    for native, eager, ref in _decode_steps(llm.engine, 12, reference=f32):
        for name, lg in (("native", native), ("eager", eager)):
            err[name].append((lg - ref).abs().mean().item())
            agree[name] += int((lg.argmax(-1) == ref.argmax(-1)).sum())
        rows += ref.shape[0]
    assert rows >= 30
    mean = {k: sum(v) / len(v) for k, v in err.items()}
    assert mean["native"] <= 1.25 * mean["eager"], mean
    assert agree["native"] >= 0.9 * rows, agree


def test_models_it_cannot_run_exactly_stay_eager():
    from engine_helpers import make_llm, tiny_llama

    llm = make_llm(tiny_llama(64))  # float32 Linear layers: nothing for the block kernel
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert llm.engine.runner.native is False and "not GGUF blocks" in llm.engine.runner.native_reason
