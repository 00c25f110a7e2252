"""GGUF loading: tiny models written with the `gguf` package's own writer, in every supported tensor
type, compared with the same model in transformers holding the dequantised weights; the llama.cpp
Q/K row permutation; metadata parsing; and the errors for broken or unsupported files."""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.gguf_file import GGUFFile  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
D, N_HEADS, N_KV, D_FF, VOCAB = 256, 4, 2, 512, 64  # rows of 256: the K-quants' block size


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rows only, so it also permutes quantised rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(sc: dict, base: float, dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py: the rope_freqs tensor of a Llama-3 checkpoint."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], sc["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """GGUF data of a weight: the gguf package's quantiser, or — for the K-quants, which it cannot
    produce — random blocks with valid f16 scales (the reference is their dequantisation either way)."""
    t = Q[qtype]
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        block, size = gguf.constants.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        scale = np.full(1, 2e-3, dtype=np.float16).view(np.uint8)
        if qtype == "Q6_K":  # ql | qh | scales | d
            blocks[..., -2:] = scale
        else:  # d | dmin | scales | ...
            blocks[..., 0:2] = scale
            blocks[..., 2:4] = np.full(1, 1e-3, dtype=np.float16).view(np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, t)


def dequant(data: np.ndarray, qtype: str) -> np.ndarray:
    return data.astype(np.float32) if qtype in ("F32", "F16") else gguf.quants.dequantize(data, Q[qtype])


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_hf(arch: str = "llama", rope_scaling: dict | None = None):
    kw = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=2, num_attention_heads=N_HEADS,
              num_key_value_heads=N_KV, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
    if arch == "qwen2":
        return _randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, tie_word_embeddings=False)))
    return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, rope_scaling=rope_scaling)))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    for k, v in GGUF_NAMES.items():
        if rest.startswith(k):
            return f"blk.{layer}.{v}{rest[len(k):]}"
    raise KeyError(hf)


def write_gguf(path, model, qtype="F32", arch="llama", skip=(), override=None, meta_override=None):
    """Write ``model`` as llama.cpp's converter would; replace its weights by their dequantised GGUF values.

    ``override``: GGUF name → (raw data, type name) written instead of the model's tensor.
    """
    cfg = model.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads,
            "rope_freq_base": 10000.0, "layer_norm_rms_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size}
    meta.update(meta_override or {})
    for k, v in meta.items():
        getattr(w, f"add_{k}")(v)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            gname = gguf_name(name)
            if gname in skip:
                continue
            arr = p.numpy().astype(np.float32)
            t = qtype if arr.ndim == 2 else "F32"
            data = encode(arr, t, rng) if t != "F32" else arr
            p.copy_(torch.from_numpy(dequant(data, t).reshape(arr.shape)))  # the reference sees what GGUF holds
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                data = llamacpp_permute(data, cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads)
            if override and gname in override:
                data, t = override[gname]
            w.add_tensor(gname, data, raw_dtype=None if t in ("F32", "F16") else Q[t])
    sc = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}  # transformers 5 / 4
    if sc.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(sc, 10000.0, cfg.hidden_size // cfg.num_attention_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("qtype", TYPES)
def test_tensor_types_match_dequantized_reference(tmp_path, qtype):
    ref = tiny_hf()
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", ref, qtype)
    g = GGUFFile(path)
    assert g.tensors["blk.0.attn_q.weight"].ggml_type == Q[qtype]
    ours = load_gguf_model(path, g=g)
    with torch.no_grad():
        want = ref(IDS).logits
        assert want.abs().max() > 0.5
        torch.testing.assert_close(ours(IDS), want, atol=1e-4, rtol=1e-4)


def test_qk_permutation_is_undone_and_needed(tmp_path):
    ref = tiny_hf()
    path = write_gguf(tmp_path / "tiny.gguf", ref, "Q8_0")
    ours = load_gguf_model(path)
    with torch.no_grad():
        want = ref(IDS).logits
        torch.testing.assert_close(ours(IDS), want, atol=1e-4, rtol=1e-4)
        # transformers' own GGUF loader reads our written file to the same numbers
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
        torch.testing.assert_close(theirs(IDS).logits, want, atol=1e-4, rtol=1e-4)
        # negative control: leaving the rows permuted changes the model
        from attnkit.loading.gguf import unpermute_qk

        q = ours.layers[0].self_attn.q_proj.weight
        q.copy_(torch.from_numpy(llamacpp_permute(q.numpy().copy(), N_HEADS)))
        assert (ours(IDS) - want).abs().max() > 1e-2
        assert torch.equal(unpermute_qk(torch.from_numpy(llamacpp_permute(np.arange(24.0).reshape(12, 2), 2)), 2),
                           torch.arange(24.0).reshape(12, 2))


def test_llama3_rope_freqs_tensor(tmp_path):
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    ref = tiny_hf(rope_scaling=sc)
    ours = load_gguf_model(write_gguf(tmp_path / "l3.gguf", ref, "F16"))
    assert ours.cfg.rope_freq_factors is not None
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-4, rtol=1e-4)


def test_qwen2_arch_biases_no_permutation(tmp_path):
    ref = tiny_hf("qwen2")
    ours = load_gguf_model(write_gguf(tmp_path / "q.gguf", ref, "Q8_0", arch="qwen2"))
    assert ours.cfg.qkv_bias and not ours.cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-4, rtol=1e-4)


def test_metadata_matches_gguf_reader(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["<s>", "é", "日本", "😀", ""])
    w.add_token_scores([0.0, -1.5, -2.25, 3.0, 0.5])
    w.add_token_types([3, 1, 1, 1, 4])
    w.add_bool("x.flag", True)
    w.add_float64("x.f64", 1.0 / 3)
    w.add_int64("x.i64", -(2**40))
    w.add_string("x.s", "ünï\ncode")
    w.add_tensor("t", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.metadata[k] == pytest.approx(f.contents()) if isinstance(f.contents(), float) else ours.metadata[k] == f.contents(), k
    assert ours.tensors["t"].shape == (2, 32)
    np.testing.assert_array_equal(ours.load("t"), np.arange(64, dtype=np.float32).reshape(2, 32))


# -- errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("g") / "good.gguf", tiny_hf(), "Q8_0")


def test_truncated_data(good_file, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = good_file.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(bad)
    assert e.value.file == str(bad) and e.value.tensor is not None and "truncated" in str(e.value)


def test_truncated_header(good_file, tmp_path):
    bad = tmp_path / "head.gguf"
    bad.write_bytes(good_file.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF header"):
        GGUFFile(bad)


def test_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(bad)


def test_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf(), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert e.value.tensor == "blk.1.ffn_up.weight" and "missing tensor" in e.value.reason and str(path) in str(e.value)


def test_shape_mismatch(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", tiny_hf(), meta_override={"feed_forward_length": 384})
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "shape mismatch" in e.value.reason and e.value.tensor.startswith("blk.0.ffn_")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", tiny_hf(), arch="phi2")  # (phi3 is supported: tests/test_family_phi3.py)
    with pytest.raises(UnsupportedModelError, match="architecture 'phi2'"):
        load_gguf_model(path)


# types without a kernel (Q2_K, …) and unknown type ids: tests/test_loading_gguf_native.py
