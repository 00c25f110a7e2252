"""GGUF files loaded quantized: Q4_0/Q4_1 blocks straight into Int4Linear (bit-exact weights, the llama.cpp Q/K
row permutation undone on codes and scales), against the float32-dequantized load and transformers holding
the GGUF's dequantized weights; Q8_0 → int8; load_causal_lm's quantize= for GGUF and HF directories."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_loading_gguf import IDS, tiny_hf, write_gguf  # noqa: E402

from attnkit.loading import load_causal_lm  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.gguf_file import GGUFFile  # noqa: E402
from attnkit.quant import Int4Linear, Int8Linear, QuantLinear  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def assert_within_half_step(q: QuantLinear, w: torch.Tensor) -> None:
    """Each weight within half a quantization step of the float-loaded one: requantized, and no row misplaced."""
    err = (q.dequantize() - w.detach()).abs()  # (N, K)
    if isinstance(q, Int8Linear):
        assert (err <= q.scales.float()[:, None] * 0.501 + 1e-6).all()
    else:
        s, _ = q.scales_zeros()
        assert (err.view(w.shape[0], -1, q.group_size) <= s[..., None] * 0.501 + 1e-6).all()


def check_layers(quant: nn.Module, floaty: nn.Module, layer_type: type, head_type: type) -> None:
    for name, m in floaty.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            assert isinstance(quant.get_submodule(name), layer_type), name
            assert_within_half_step(quant.get_submodule(name), m.weight)
    assert isinstance(quant.output_head, head_type) and quant.lm_head is None
    head_w = floaty.tok_embeddings.weight if floaty.lm_head is None else floaty.lm_head.weight
    assert_within_half_step(quant.output_head, head_w)


@pytest.fixture(scope="module", params=[("llama", "Q4_1"), ("llama", "Q4_0"), ("qwen2", "Q4_1")], ids=str)
def q4_file(request, tmp_path_factory):
    arch, qtype = request.param
    hf = tiny_hf(arch)
    path = write_gguf(tmp_path_factory.mktemp("q4") / f"{arch}-{qtype}.gguf", hf, qtype, arch=arch)
    with torch.no_grad():
        want = hf(IDS).logits  # transformers with the GGUF's dequantized weights
    return path, arch, qtype, want


def test_q4_blocks_decode_like_gguf_reference(q4_file):
    path, _, qtype, _ = q4_file
    g = GGUFFile(path)
    codes, d, m = g.load_q4("blk.0.ffn_up.weight")
    assert codes.dtype.name == "uint8" and codes.max() <= 15 and (m is None) == (qtype == "Q4_0")
    w = codes.reshape(codes.shape[0], -1, 32).astype("float32")
    w = (w - 8) * d[..., None] if m is None else w * d[..., None] + m[..., None]
    ref = g.load("blk.0.ffn_up.weight")  # gguf.quants.dequantize, llama.cpp's reference decoder
    assert abs(w.reshape(ref.shape) - ref).max() <= 1e-6 * abs(ref).max()


def test_q4_direct_is_the_dequantized_model(q4_file):
    """float32 kernels: the only difference from the float32-dequantized model is float32 rounding."""
    path, arch, _, want = q4_file
    floaty = load_gguf_model(path)
    quant = load_gguf_model(path, quantize="auto", compute_dtype=torch.float32)
    linears = [n for n, m in floaty.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        q = quant.get_submodule(name) if name != "lm_head" else quant.output_head
        assert isinstance(q, Int4Linear) and q.group_size == 32, name
        w = floaty.get_submodule(name).weight.detach()
        torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=1e-6 * float(w.abs().max()))  # Q/K rows too
        if name.endswith(("q_proj", "k_proj", "v_proj")) and arch == "qwen2":
            torch.testing.assert_close(q.bias, floaty.get_submodule(name).bias)
    with torch.inference_mode():
        got = quant(IDS)
        torch.testing.assert_close(got, floaty(IDS), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # transformers, same weights


def test_q4_direct_bf16_kernels_close(q4_file):
    path, _, _, want = q4_file
    fast = load_gguf_model(path, quantize="auto")  # bf16 scales and activations into the kernel
    assert all(m.compute_dtype == torch.bfloat16 for m in fast.modules() if isinstance(m, QuantLinear))
    with torch.inference_mode():
        assert rel_err(fast(IDS), want) < 0.03
    half = load_gguf_model(path, torch.bfloat16, quantize="auto")  # bf16 activations throughout
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out = half(IDS)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 0.05


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    hf = tiny_hf("llama")
    hf.config.tie_word_embeddings = True
    path = write_gguf(tmp_path_factory.mktemp("q8") / "q8.gguf", hf, "Q8_0", skip=("output.weight",))
    return path


def test_auto_q8_is_int8_and_float_types_stay_float(q8_file, tmp_path):
    m = load_gguf_model(q8_file, quantize="auto")
    ref = load_gguf_model(q8_file)
    check_layers(m, ref, Int8Linear, Int8Linear)  # the tied head too
    with torch.inference_mode():
        assert rel_err(m(IDS), ref(IDS)) < 0.06
    f16 = write_gguf(tmp_path / "f16.gguf", tiny_hf("llama"), "F16")
    kept = load_gguf_model(f16, quantize="auto")
    assert isinstance(kept.layers[0].self_attn.q_proj, nn.Linear) and kept.output_head is None


def test_int4_requantizes_and_keeps_an_int8_head(q8_file):
    m = load_gguf_model(q8_file, quantize="int4", group_size=64)
    assert m.layers[0].self_attn.k_proj.group_size == 64
    check_layers(m, load_gguf_model(q8_file), Int4Linear, Int8Linear)  # head: never requantized to int4


def test_int8_on_q4(q4_file):
    path, _, _, want = q4_file
    m = load_gguf_model(path, quantize="int8")
    check_layers(m, load_gguf_model(path), Int8Linear, Int8Linear)
    with torch.inference_mode():
        assert rel_err(m(IDS), want) < 0.1


def test_load_causal_lm_bad_requests(q8_file):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_causal_lm(q8_file, quantize="int2")
    with pytest.raises(ValueError, match="group size must be one of"):
        load_gguf_model(q8_file, quantize="int4", group_size=100)


def test_hf_directory_quantized(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    floaty = load_causal_lm(tmp_path)
    assert load_causal_lm(tmp_path, quantize="auto").model.output_head is None  # nothing to keep: float
    lm = load_causal_lm(tmp_path, quantize="int4")
    check_layers(lm.model, floaty.model, Int4Linear, Int8Linear)  # untied lm_head → int8 output head
    q = lm.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.bias, floaty.model.layers[0].self_attn.q_proj.bias.detach())  # Qwen2's bias
    with pytest.raises(ValueError, match="group size must be one of"):
        load_causal_lm(tmp_path, quantize="int4", group_size=8)
