"""Quantized KV caches (attnkit.engine.kv_format): rows stored as GGUF q8_0 / q4_0 blocks, llama.cpp's
``-ctk q8_0 / q4_0``. The rows are those of gguf's own quantizer (byte for byte) and read back as its
dequantizer reads them; the engine over a quantized pool stays close to float32 K/V, its C and PyTorch read
paths agree (both storing rows Hadamard-rotated where hd is a multiple of 64), and the pool holds ~1.9× / ~3.6×
the tokens of float16 in the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import make_llm, random_prompts, tiny_llama
from gguf import GGMLQuantizationType, quants

from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
from attnkit.engine import model_runner as mr
from attnkit.engine import paged_attention as pa
from attnkit.engine.kv_format import hadamard64, kv_format
from attnkit.engine.model_runner import ModelRunner
from attnkit.kernels import library

VOCAB = 320
GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def _rows(hd: int, n: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hd, generator=g) * torch.rand(n, 1, generator=g) * 4
    x[0] = 0  # an all-zero block: scale 0
    x[1, :32] = 1.0  # ties in the largest magnitude
    x[2, :32] = torch.arange(32) / 2 - 8  # halves: round half away from zero
    return x


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
@pytest.mark.parametrize("hd", [64, 128])
def test_rows_are_ggufs_blocks(name, hd):
    fmt, x = kv_format(name), _rows(hd)
    ref = quants.quantize(x.numpy(), GGML[name])  # (n, row bytes)
    torch_rows = fmt._quantize_torch(x.reshape(len(x), hd // 32, 32)).reshape(len(x), -1)
    np.testing.assert_array_equal(torch_rows.numpy(), ref)
    np.testing.assert_array_equal(fmt.quantize(x).numpy(), ref)  # the C quantizer where it is built
    back = fmt.dequantize(torch.from_numpy(ref))
    np.testing.assert_allclose(back.numpy(), quants.dequantize(ref, GGML[name]), rtol=0, atol=0)
    assert fmt.row_bytes(hd) == ref.shape[1]


def test_names_and_sizes():
    assert kv_format("int8") is kv_format("q8_0") and kv_format("int4") is kv_format("q4_0")
    assert kv_format(torch.float16).name == "float16"
    with pytest.raises(ValueError, match="unknown KV cache format 'q3'"):
        kv_format("q3")
    model = tiny_llama(VOCAB, d_model=128, n_heads=2, n_kv_heads=1)  # hd 64
    f16 = ModelRunner.bytes_per_block(model, 16, torch.float16)
    assert ModelRunner.bytes_per_block(model, 16, "q8_0") / f16 == 68 / 128
    assert ModelRunner.bytes_per_block(model, 16, "int4") / f16 == 36 / 128


def test_a_head_dim_not_in_blocks_is_refused_by_name():
    model = tiny_llama(VOCAB)  # hd 16
    with pytest.raises(ValueError, match="q4_0 KV cache needs a head dimension that is a multiple of 32, got 16"):
        LLMEngine(model, config=EngineConfig(kv_cache_dtype="q4_0"))


def _logits(model, kv: str, prompts, params, torch_only: bool = False, monkeypatch=None, **engine_kw):
    """Each request's logprob rows and tokens, the first generated token's full logits too."""
    if torch_only:  # the PyTorch read paths: gathered rows dequantized, prefill chunks through SDPA
        monkeypatch.setattr(pa, "native_kernel", lambda *a, **k: None)
        monkeypatch.setattr(mr, "native_kernel", lambda *a, **k: None)
    engine_kw = {"block_size": 4, "kv_cache_bytes": 4 << 20, "max_num_batched_tokens": 64} | engine_kw
    llm = make_llm(model, kv_cache_dtype=kv, **engine_kw)
    outs = llm.generate(prompts, params)
    if torch_only:
        monkeypatch.undo()
    return outs


@pytest.fixture(scope="module", params=[32, 64], ids=["hd32", "hd64-rotated"])
def model(request):
    """GQA; at hd 64 the rows are stored Hadamard-rotated (a rotation not undone would wreck the outputs)."""
    return tiny_llama(VOCAB, d_model=4 * request.param, n_heads=4, n_kv_heads=2, n_layers=2)


def test_hadamard_is_the_orthonormal_sylvester_matrix_per_64_values():
    h = torch.ones(1, 1)
    for _ in range(6):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    h = h / 8  # (64, 64), its own inverse
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    torch.testing.assert_close(hadamard64(x), (x.view(3, 5, 2, 64) @ h.double()).view(3, 5, 128))
    torch.testing.assert_close(hadamard64(hadamard64(x)), x)
    assert kv_format("q4_0").rotates(64) and kv_format("q8_0").rotates(128) and not kv_format("q4_0").rotates(96)
    assert not kv_format("float16").rotates(64)


@pytest.mark.skipif(library() is None, reason="needs the C kernels")
def test_hadamard64_in_c_gives_the_butterflies_floats():
    """ak_hadamard64 (the engine's float32 rows) and the PyTorch butterflies: the same floats, bit for bit, on a
    strided view (copied, never written) and past the C kernel's 4,096-value chunks."""
    x = torch.randn(1, 9, 300, 64).transpose(1, 2)  # (1, 300, 9, 64), not contiguous
    before = x.clone()
    out = hadamard64(x)
    assert torch.equal(out, hadamard64(x, native=False)) and torch.equal(x, before)
    assert not torch.equal(out, x) and torch.allclose(hadamard64(out), x, atol=1e-5)


@pytest.mark.parametrize("name,tol", [("q8_0", 0.02), ("q4_0", 0.25)])
def test_engine_on_a_quantized_pool_stays_close_to_float32(model, name, tol, monkeypatch):
    prompts = random_prompts(6, VOCAB, 20, 90, seed=3)  # chunked prefills (64-token steps) and decodes
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=0)
    ref = _logits(model, "float32", prompts, params)
    out = _logits(model, name, prompts, params)
    errs, same = [], 0
    for r, o in zip(ref, out):
        same += r.token_ids == o.token_ids
        # the prompt's logprob of each actual token (every chunk boundary and cached-prefix read) …
        rp = torch.tensor([next(iter(d.values())) for d in r.prompt_logprobs[1:]])
        op = torch.tensor([next(iter(d.values())) for d in o.prompt_logprobs[1:]])
        errs.append((rp - op).abs().max())
    err = max(errs)
    assert 0 < err < tol, err  # quantized, so not bit-equal; close
    assert same >= len(prompts) - (0 if name == "q8_0" else 2)


@pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")
@pytest.mark.parametrize("name,exact", [("q8_0", False), ("q4_0", False), ("q4_0", True)])
def test_c_and_torch_read_paths_agree(model, name, exact, monkeypatch):
    """Also with exact blocks (attnkit.engine.kv_tail): the PyTorch paths follow the C kernels' rule."""
    prompts = random_prompts(5, VOCAB, 5, 60, seed=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=0)
    c = _logits(model, name, prompts, params, kv_exact_blocks=exact)
    t = _logits(model, name, prompts, params, torch_only=True, monkeypatch=monkeypatch, kv_exact_blocks=exact)
    assert (c[0].prompt_logprobs is not None) and exact == (name == "q4_0" and exact)
    for a, b in zip(c, t):
        assert a.token_ids == b.token_ids
        la = torch.tensor([lp[tok] for lp, tok in zip(a.outputs[0].logprobs, a.token_ids)])
        lb = torch.tensor([lp[tok] for lp, tok in zip(b.outputs[0].logprobs, b.token_ids)])
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        # the prompt rows: C row attention against the PyTorch chunks (under exact blocks, _prefill_exact)
        pa_ = torch.tensor([next(iter(d.values())) for d in a.prompt_logprobs[1:]])
        pb_ = torch.tensor([next(iter(d.values())) for d in b.prompt_logprobs[1:]])
        torch.testing.assert_close(pa_, pb_, rtol=1e-4, atol=1e-4)
