"""attnkit's GGUF quantizer (attnkit.quant.gguf_quantize) and random Llama-, Qwen3- and Qwen3-MoE-shaped GGUFs
(attnkit.loading.gguf_writer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quantize

from attnkit.loading.defaults import default_chat_model
from attnkit.loading.gguf import load_gguf_model
from attnkit.loading.gguf_file import GGUFFile
from attnkit.loading.gguf_writer import llama_shape, tensor_shapes, write_llama_gguf
from attnkit.quant import gguf_quantize as gq
from attnkit.quant.gguf_quantize import quantize_rows, read_metadata, requantize, tensor_type, use_more_bits

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "context_length": 512}


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", TINY, "F16", threads=1)


def _rel_rms(w: np.ndarray, blocks: np.ndarray, name: str) -> float:
    r = dequantize(blocks, GGMLQuantizationType[name]).reshape(w.shape)
    return float(np.sqrt(np.mean((r - w) ** 2) / np.mean(w ** 2)))


# -- the quantizers -----------------------------------------------------------------------------------------

BOUNDS = {"Q4_0": 0.1, "Q4_1": 0.09, "Q5_0": 0.05, "Q5_1": 0.045, "Q8_0": 0.007,
          "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_quantize_rows_error_on_gaussian_weights(name):
    w = (np.random.default_rng(0).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    b = quantize_rows(w, name, threads=2)
    assert b.dtype == np.uint8 and b.shape == (64, gq.row_bytes(name, 1024))
    err = _rel_rms(w, b, name)
    assert err < BOUNDS[name], err
    assert err > BOUNDS[name] / 4  # a real quantization, not a copy


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_types_equal_gguf_bit_for_bit(name):
    w = (np.random.default_rng(1).standard_normal((40, 512)) * 0.05).astype(np.float32)
    assert np.array_equal(quantize_rows(w, name), quantize(w, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_on_awkward_rows(name):
    rng = np.random.default_rng(2)
    w = np.stack([np.zeros(512), np.full(512, 0.3), np.full(512, -0.2), -np.abs(rng.standard_normal(512)),
                  np.abs(rng.standard_normal(512)) + 1, rng.standard_normal(512) * 1e-30,
                  np.r_[np.zeros(256), rng.standard_normal(256)], rng.standard_normal(512) * 100]).astype(np.float32)
    r = dequantize(quantize_rows(w, name), GGMLQuantizationType[name]).reshape(w.shape)
    assert np.isfinite(r).all()
    assert np.array_equal(r[0], w[0])  # zeros stay zeros
    assert np.abs(r[5]).max() < 1e-20  # below float16's range: the scales underflow to 0, as in ggml
    keep = [0, 1, 2, 3, 4, 6, 7]
    scale = np.abs(w[keep]).max(1, keepdims=True) + 1e-30
    assert (np.abs(r[keep] - w[keep]) / scale).max() < 0.1


def _make_qkx2_scalar(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants transcribed literally (float32 scalars, sequential sums) for one sub-block."""
    f = np.float32
    mn, mx = min(f(x.min()), f(0)), f(x.max())
    sum_w, sum_x = f(0), f(0)
    for i in range(len(x)):
        sum_w, sum_x = f(sum_w + w[i]), f(sum_x + f(w[i] * x[i]))
    iscale = f(f(nmax) / f(mx - mn))
    scale = f(f(1) / iscale)
    L = [max(0, min(nmax, int(np.rint(f(iscale * f(xi - mn)))))) for xi in x]
    best = f(0)
    for i in range(len(x)):
        d = f(f(f(scale * f(L[i])) + mn) - x[i])
        best = f(best + f(w[i] * f(d * d)))
    for s in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(s))) + f(nmax)) / f(mx - mn))
        la = [max(0, min(nmax, int(np.rint(f(iscale * f(xi - mn)))))) for xi in x]
        sl = sl2 = sxl = f(0)
        for i in range(len(x)):
            sl, sl2, sxl = f(sl + f(w[i] * la[i])), f(sl2 + f(f(w[i] * la[i]) * la[i])), f(sxl + f(f(w[i] * la[i]) * x[i]))
        D = f(f(sum_w * sl2) - f(sl * sl))
        if D > 0:
            ts, tm = f(f(f(sum_w * sxl) - f(sum_x * sl)) / D), f(f(f(sl2 * sum_x) - f(sl * sxl)) / D)
            if tm > 0:
                tm, ts = f(0), f(sxl / sl2)
            cur = f(0)
            for i in range(len(x)):
                d = f(f(f(ts * f(la[i])) + tm) - x[i])
                cur = f(cur + f(w[i] * f(d * d)))
            if cur < best:
                L, best, scale, mn = la, cur, ts, tm
    return scale, -mn, np.array(L)


@pytest.mark.parametrize("nmax,rmin,nstep", [(15, -1.0, 20), (31, -0.5, 15)])
def test_make_qkx2_follows_ggml(nmax, rmin, nstep):
    x = (np.random.default_rng(3).standard_normal((24, 32)) * 0.02).astype(np.float32)
    w = np.sqrt((x * x).sum(-1, keepdims=True) / np.float32(32)) + np.abs(x)
    scale, the_min, L = gq._make_qkx2(x, w, nmax, rmin, 0.1, nstep)
    same = 0
    for k in range(len(x)):
        s, m, lk = _make_qkx2_scalar(x[k], w[k], nmax, rmin, 0.1, nstep)
        np.testing.assert_allclose([scale[k, 0], the_min[k, 0]], [s, m], rtol=1e-4)
        same += np.array_equal(L[k], lk)
    assert same >= len(x) - 1  # the same candidate (a near-tie aside): sums run in another order


# -- llama-quantize's choice of types ------------------------------------------------------------------------

def test_use_more_bits_matches_llama_cpp():
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(28) if use_more_bits(i, 28)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


@pytest.mark.parametrize("preset,name,shape,tied,expected", [
    ("Q4_K_M", "output.weight", (49152, 2048), False, "Q6_K"),
    ("Q4_K_M", "token_embd.weight", (49152, 2048), True, "Q6_K"),
    ("Q4_K_M", "token_embd.weight", (49152, 2048), False, "Q4_K"),
    ("Q4_K_M", "blk.0.attn_v.weight", (512, 2048), True, "Q6_K"),
    ("Q4_K_M", "blk.3.attn_v.weight", (512, 2048), True, "Q4_K"),
    ("Q4_K_M", "blk.4.attn_v.weight", (512, 2048), True, "Q6_K"),
    ("Q4_K_M", "blk.4.ffn_down.weight", (2048, 8192), True, "Q6_K"),
    ("Q4_K_M", "blk.5.ffn_down.weight", (2048, 8192), True, "Q4_K"),
    ("Q4_K_M", "blk.5.attn_q.weight", (2048, 2048), True, "Q4_K"),
    ("Q4_K_M", "blk.5.attn_norm.weight", (2048,), True, "F32"),
    ("Q4_K_S", "blk.3.attn_v.weight", (512, 2048), True, "Q5_K"),
    ("Q4_K_S", "blk.4.attn_v.weight", (512, 2048), True, "Q4_K"),
    ("Q4_K_S", "blk.1.ffn_down.weight", (2048, 8192), True, "Q5_K"),
    ("Q4_K_S", "blk.2.ffn_down.weight", (2048, 8192), True, "Q4_K"),
    ("Q5_K_M", "blk.0.ffn_down.weight", (2048, 8192), True, "Q6_K"),
    ("Q5_K_S", "blk.0.ffn_down.weight", (2048, 8192), True, "Q5_K"),
    ("Q6_K", "blk.0.attn_q.weight", (2048, 2048), True, "Q6_K"),
    ("Q8_0", "token_embd.weight", (49152, 2048), True, "Q8_0"),
    ("Q8_0", "blk.0.attn_v.weight", (512, 2048), True, "Q8_0"),
    ("Q4_0", "token_embd.weight", (49152, 2048), True, "Q6_K"),
    ("Q4_0", "token_embd.weight", (49152, 2048), False, "Q4_0"),
    ("Q4_0", "blk.0.ffn_down.weight", (2048, 8192), True, "Q4_0"),
    ("Q5_1", "blk.0.attn_q.weight", (2048, 2048), True, "Q5_1"),
    ("F16", "token_embd.weight", (49152, 2048), True, "F16"),
    ("F16", "output_norm.weight", (2048,), True, "F32"),
    # rows of 576 (SmolLM2-135M): the 256-block types fall back to 32-block ones
    ("Q4_K_M", "blk.5.attn_q.weight", (576, 576), True, "Q5_0"),
    ("Q5_K_M", "blk.5.attn_q.weight", (576, 576), True, "Q5_1"),
    ("Q4_K_M", "token_embd.weight", (49152, 576), True, "Q8_0"),
    ("Q4_0", "token_embd.weight", (49152, 576), True, "Q8_0"),
    ("Q4_K_M", "blk.0.attn_v.weight", (192, 576), True, "Q8_0"),
    ("Q4_K_M", "blk.0.ffn_down.weight", (576, 1536), True, "Q6_K"),
])
def test_tensor_type_follows_llama_quantize(preset, name, shape, tied, expected):
    assert tensor_type(preset, name, 16, shape, tied) == expected


def test_bad_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        tensor_type("Q3_X", "blk.0.attn_q.weight", 16)


# -- random Llama-shaped files ---------------------------------------------------------------------------------

def test_shapes():
    s = llama_shape("llama-3.2-1b")
    n = sum(int(np.prod(shp)) for _, shp in tensor_shapes(s, 128256))
    assert n == 1_235_814_400  # Llama-3.2-1B's parameter count (tied embeddings)
    s3 = llama_shape("llama-3.2-3b")
    assert sum(int(np.prod(shp)) for _, shp in tensor_shapes(s3, 128256)) == 3_212_749_824
    with pytest.raises(ValueError):
        llama_shape({"d_model": 64})


def test_random_model_loads_with_default_tokenizer(tiny_f16):
    g = GGUFFile(tiny_f16)
    src = GGUFFile(default_chat_model())
    assert g.metadata["general.architecture"] == "llama"
    assert g.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    assert g.tensors["token_embd.weight"].shape == (49152, 64) and "output.weight" not in g.tensors
    assert g.tensors["blk.0.attn_q.weight"].ggml_type.name == "F16"
    assert g.tensors["blk.0.attn_norm.weight"].ggml_type.name == "F32"
    model = load_gguf_model(tiny_f16, quantize=None)
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 500, 1000, 2000, 30000]]))
    assert torch.isfinite(logits).all() and logits.std() > 0.05


def test_write_quantized_preset_directly(tmp_path):
    p = write_llama_gguf(tmp_path / "t.gguf", {**TINY, "d_model": 256, "n_heads": 4}, "Q4_K_M", threads=1)
    g = GGUFFile(p)
    assert g.metadata["general.file_type"] == 15
    types = {n: t.ggml_type.name for n, t in g.tensors.items()}
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.1.attn_v.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q4_K"  # use_more_bits(1, 2)
    assert np.isfinite(g.load("blk.0.ffn_down.weight")).all()


# -- Qwen3 and Qwen3-MoE files (general.architecture qwen3, qwen3moe) ------------------------------------------------

TINY_MOE = {"arch": "qwen3moe", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
            "d_ff": 128, "n_experts": 8, "n_experts_per_tok": 2, "moe_d_ff": 32, "context_length": 512, "norm_eps": 1e-6}


def test_qwen3_shapes_and_parameter_counts():
    from attnkit.loading.gguf_writer import param_counts

    # Qwen3-1.7B's config.json with its own 151 936-token vocabulary: 1.72B with tied embeddings
    total, active = param_counts(llama_shape("qwen3-1.7b"), 151936)
    assert total == active == 1_720_574_976  # 1.41B of them outside the embeddings
    names = dict(tensor_shapes(llama_shape("qwen3-1.7b"), 151936))
    assert names["blk.0.attn_q.weight"] == (2048, 2048) and names["blk.27.attn_k_norm.weight"] == (128,)
    # the benchmark's MoE: >= 2B parameters, <= 0.6B of them per token (8 of 64 experts)
    total, active = param_counts(llama_shape("qwen3-moe-2.6b-a0.5b"), 49152)
    assert total >= 2e9 and active <= 0.6e9
    s = llama_shape(TINY_MOE)
    shapes = dict(tensor_shapes(s, 100))
    assert shapes["blk.1.ffn_gate_inp.weight"] == (8, 64) and shapes["blk.1.ffn_gate_exps.weight"] == (8, 32, 64)
    assert shapes["blk.1.ffn_down_exps.weight"] == (8, 64, 32) and "blk.0.ffn_gate.weight" not in shapes
    total, active = param_counts(s, 100)
    assert total - active == 2 * 3 * (8 - 2) * 32 * 64  # the experts that do not run
    with pytest.raises(ValueError, match="n_experts"):
        llama_shape({**TINY_MOE, "n_experts": 0})
    with pytest.raises(ValueError, match="arch"):
        llama_shape({**TINY_MOE, "arch": "gpt2"})


def test_qwen3moe_file_has_the_converters_keys_and_tensors(tmp_path):
    p = write_llama_gguf(tmp_path / "moe.gguf", TINY_MOE, "Q8_0", threads=1)
    g = GGUFFile(p)
    m = g.metadata
    assert m["general.architecture"] == "qwen3moe"
    assert (m["qwen3moe.expert_count"], m["qwen3moe.expert_used_count"], m["qwen3moe.expert_feed_forward_length"]) == (8, 2, 32)
    assert m["qwen3moe.attention.key_length"] == m["qwen3moe.attention.value_length"] == 32  # ≠ 64 / 4
    t = g.tensors
    assert t["blk.0.ffn_gate_inp.weight"].ggml_type.name == "F32"  # the router stays float, as the converter writes it
    assert t["blk.0.ffn_up_exps.weight"].ggml_type.name == "Q8_0" and t["blk.0.ffn_up_exps.weight"].shape == (8, 32, 64)
    assert t["blk.0.attn_q_norm.weight"].shape == (32,) and t["blk.0.attn_q_norm.weight"].ggml_type.name == "F32"
    assert np.isfinite(g.load("blk.1.ffn_down_exps.weight")).all()
    try:
        from attnkit.loading.errors import UnsupportedModelError

        model = load_gguf_model(p, quantize="gguf")
    except (UnsupportedModelError, ImportError) as e:  # pragma: no cover - the MoE loader not here
        pytest.skip(f"attnkit does not load qwen3moe files here: {e}")
    ffn = model.layers[0].ffn
    assert (ffn.n_experts, ffn.top_k) == (8, 2)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 500, 1000, 2000]]))
    assert torch.isfinite(logits).all() and logits.std() > 0.05


def test_llama_cpp_takes_the_qwen3moe_file(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    bin_dir = Path(os.environ.get("ATTNKIT_LLAMA_BIN", "/opt/llama.cpp/bin"))
    if not (bin_dir / "llama-quantize").is_file() or not (bin_dir / "llama-bench").is_file():
        pytest.skip(f"no llama-quantize / llama-bench in {bin_dir} (ATTNKIT_LLAMA_BIN)")
    f16 = write_llama_gguf(tmp_path / "moe-F16.gguf", TINY_MOE, "F16", threads=1)
    q = tmp_path / "moe-Q4_K_M.gguf"
    r = subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(q), "Q4_K_M", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    r = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(q), "-t", "1", "-p", "0", "-n", "4", "-r", "1",
                        "-o", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    import json

    row = json.loads(r.stdout)[0]
    assert "qwen3moe" in row["model_type"] and row["avg_ts"] > 0


# -- Gemma 3 files (general.architecture gemma3) ----------------------------------------------------------------------
def test_gemma3_file_loads_as_gemma3_and_decodes_in_the_c_step(tmp_path):
    """The writer's gemma3 file: its keys and tensors as llama.cpp's converter names them; attnkit reads five
    windowed layers to one global with their own RoPE base, q/k and sandwich norms; its engine decodes it in the C
    step with the eager engine's greedy tokens, past the window (8)."""
    from engine_helpers import engine_greedy

    from attnkit.engine import EngineConfig, LLMEngine
    from attnkit.engine.native_decode import NativeDecoder
    from attnkit.kernels import library
    from attnkit.nn.fused import fuse_for_inference

    p = write_llama_gguf(tmp_path / "gemma3.gguf", "tiny-gemma3", "Q8_0", threads=1)
    g = GGUFFile(p)
    m = g.metadata
    assert m["general.architecture"] == "gemma3" and m["gemma3.attention.sliding_window"] == 8
    assert g.tensors["blk.0.post_ffw_norm.weight"].shape == (64,) and "blk.5.attn_k_norm.weight" in g.tensors
    cfg = load_gguf_model(p).cfg
    assert cfg.layer_windows == [8] * 5 + [None] and cfg.rope_local_theta == 10000.0 and cfg.post_norms
    assert cfg.act == "gelu_tanh" and cfg.qk_norm == "head" and cfg.embed_scale == pytest.approx(8.0)
    if library() is None:
        pytest.skip("attnkit's C kernels are not built")
    prompts = [[1, 500, 1000, 2000, 7], list(range(300, 320))]
    outs = []
    for native in (True, False):
        engine = LLMEngine(fuse_for_inference(load_gguf_model(p, quantize="gguf")), config=EngineConfig(block_size=4))
        outs.append(engine_greedy(engine, prompts, 12, c_step=native))
        if native:
            assert isinstance(engine.runner.native, NativeDecoder), engine.runner.native_reason
    assert outs[0] == outs[1]


# -- requantize and the CLI ---------------------------------------------------------------------------------------

def test_requantize_keeps_metadata_and_types(tiny_f16, tmp_path):
    out = tmp_path / "q.gguf"
    types = requantize(tiny_f16, out, "Q4_K_M", threads=1)
    a, b = read_metadata(tiny_f16), read_metadata(out)
    assert b["general.file_type"] == (15, GGUFValueType.UINT32, None)
    assert b["general.quantization_version"][0] == 2
    for key, val in a.items():
        if key != "general.file_type":
            assert b[key] == val, key  # value, value type and element type
    assert b["tokenizer.ggml.tokens"][2] == GGUFValueType.STRING
    g0, g1 = GGUFFile(tiny_f16), GGUFFile(out)
    assert {n: t.ggml_type.name for n, t in g1.tensors.items()} == types
    # d_model 64 is no multiple of 256: Q4_K falls back to Q5_0, Q6_K (head, bumped layers) to Q8_0
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q5_0"
    assert np.array_equal(g0.load("blk.0.attn_norm.weight"), g1.load("blk.0.attn_norm.weight"))
    w0, w1 = g0.load("blk.0.ffn_up.weight"), g1.load("blk.0.ffn_up.weight")
    assert np.sqrt(np.mean((w0 - w1) ** 2) / np.mean(w0 ** 2)) < 0.06
    model = load_gguf_model(out, quantize=None)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_cli(tiny_f16, tmp_path, capsys):
    from attnkit.cli import main

    assert main(["quantize", "--quiet", str(tiny_f16), str(tmp_path / "o.gguf"), "q8_0"]) == 0
    assert GGUFFile(tmp_path / "o.gguf").metadata["general.file_type"] == 7
    assert main(["quantize", str(tiny_f16), str(tmp_path / "o2.gguf"), "Q9_K"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o3.gguf"), "Q8_0"]) == 2
    assert "no such file" in capsys.readouterr().err
