"""attnkit.quant: the int8/int4 weight-only layers against their own dequantized float weights, the packing
round trip, cat_out, quantize_model on tiny Llama / Qwen2 models, and the errors for bad requests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnkit.models.llama import Llama, LlamaConfig
from attnkit.quant import Int4Linear, Int8Linear, QuantLinear, cat_out, quantize_model, set_compute_dtype
from attnkit.quant.int4 import _unpack_by_kernel, pack, unpack

CLASSES = {"int8": lambda w, b, cdt: Int8Linear.from_float(w, b, cdt),
           "int4": lambda w, b, cdt: Int4Linear.from_float(w, b, 32, cdt)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("n", [40, 96, 200])  # 40, 200: not multiples of 16 (int4 pads)
def test_kernel_matches_dequantized_weight(scheme, n):
    g = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, 128, generator=g), torch.randn(n, generator=g)
    x = torch.randn(2, 5, 128, generator=g)  # (B, T, in)
    exact = CLASSES[scheme](w, b, torch.float32)  # float32 kernel: Ŵ exactly, float32 arithmetic
    ref = F.linear(x, exact.dequantize(), b)
    y = exact(x)
    assert y.shape == (2, 5, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    fast = CLASSES[scheme](w, b, torch.bfloat16)  # the default: bf16 activations into the kernel
    bound = float((exact.dequantize() - w).abs().max())  # the rounding error of the scheme itself
    assert float((fast.dequantize() - w).abs().max()) <= 1.05 * bound  # bf16 scales: barely more
    ref16 = F.linear(x.bfloat16().float(), fast.dequantize(), b)
    assert rel_err(fast(x), ref16) < 1e-2
    y16 = fast(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and rel_err(y16, ref16) < 2e-2


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_groups_error_bound(group):
    g = torch.Generator().manual_seed(group)
    w = torch.randn(48, 512, generator=g) * torch.linspace(0.1, 3, 512)  # groups of different ranges
    q = Int4Linear.from_float(w, None, group, torch.float32)
    s, z = q.scales_zeros()  # (N, K/G)
    err = (q.dequantize() - w).abs().view(48, -1, group)
    assert (err <= s[..., None] / 2 + 1e-6).all()  # round to nearest on the group's grid
    assert q.group_size == group and s.shape == (48, 512 // group)
    lo = w.view(48, -1, group).amin(-1)
    torch.testing.assert_close(z - 8 * s, lo)  # the grid starts at the group minimum


def test_int8_error_bound_and_zero_rows():
    w = torch.randn(32, 64)
    w[3] = 0
    q = Int8Linear.from_float(w, None, torch.float32)
    assert ((q.dequantize() - w).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    assert q.dequantize()[3].abs().max() == 0 and q.qweight.dtype == torch.int8


def test_from_codes_is_exact():
    """Ŵ = s·(Q − 8) + z with the given codes, scales and zeros (what GGUF Q4 blocks load into)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), generator=g, dtype=torch.uint8)
    s, z = torch.rand(24, 2, generator=g), torch.randn(24, 2, generator=g)
    q = Int4Linear.from_codes(codes, s, z, 32, compute_dtype=torch.float32)
    assert torch.equal(q.codes(), codes)
    want = (codes.float().view(24, 2, 32) - 8) * s[..., None] + z[..., None]
    torch.testing.assert_close(q.dequantize(), want.view(24, 64), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(n16=st.integers(1, 12), k32=st.integers(1, 4), start=st.integers(0, 200), length=st.integers(1, 200))
def test_pack_unpack_round_trip(n16, k32, start, length):
    n, k = 16 * n16, 32 * k32
    g = torch.Generator().manual_seed(n * k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack(codes)
    start = min(start, n - 1)
    stop = min(n, start + length)
    assert torch.equal(unpack(packed, n, k, start, stop), codes[start:stop])
    assert torch.equal(_unpack_by_kernel(packed, n, k), codes)  # the layout-free way agrees


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dense_path_matches_kernel(scheme, monkeypatch):
    g = torch.Generator().manual_seed(1)
    monkeypatch.setattr("attnkit.quant.base.DENSE_CHUNK", 64 * 1000)  # slices of 960 rows
    w = torch.randn(3000, 64, generator=g)
    q = CLASSES[scheme](w, torch.randn(3000, generator=g), torch.float32)
    x = torch.randn(40, 64, generator=g)
    monkeypatch.setattr(type(q), "dense_min_rows", None)
    y_kernel = q(x)
    orig, calls = type(q).dequantize, []

    def spy(self, *a):
        calls.append(a)
        return orig(self, *a)

    monkeypatch.setattr(type(q), "dequantize", spy)
    monkeypatch.setattr(type(q), "dense_min_rows", 8)
    torch.testing.assert_close(q(x), y_kernel, rtol=1e-5, atol=1e-4)
    assert len(calls) > 1  # the dense path, in slices of rows
    calls.clear()
    assert q(x[:4]).shape == (4, 3000) and not calls  # below the threshold: the kernel again


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
def test_cat_out_equals_separate_layers(scheme, cdt):
    g = torch.Generator().manual_seed(2)
    parts = [CLASSES[scheme](torch.randn(n, 64, generator=g), torch.randn(n, generator=g), cdt) for n in (64, 32, 32)]
    parts[1].bias = None  # a part without bias gets zeros
    fused = cat_out(parts)
    assert type(fused) is type(parts[0]) and fused.out_features == 128 and fused.in_features == 64
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1), rtol=0, atol=0)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)


def test_cat_out_plain_linear_and_errors():
    a, b = nn.Linear(8, 4), nn.Linear(8, 6, bias=False)
    x = torch.randn(2, 8)
    torch.testing.assert_close(cat_out([a, b])(x), torch.cat([a(x), b(x)], -1))
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="one class"):
        cat_out([Int8Linear.from_float(w), Int4Linear.from_float(w)])
    with pytest.raises(ValueError, match="in_features"):
        cat_out([Int8Linear.from_float(w), Int8Linear.from_float(torch.randn(32, 128))])
    with pytest.raises(ValueError, match="group size"):
        cat_out([Int4Linear.from_float(w, group_size=32), Int4Linear.from_float(w, group_size=64)])
    with pytest.raises(ValueError, match="at least one"):
        cat_out([])


def test_bad_inputs_are_clear_errors():
    w = torch.randn(32, 96)
    with pytest.raises(ValueError, match="does not divide in_features 96"):
        Int4Linear.from_float(w, group_size=64)
    with pytest.raises(ValueError, match="group size must be one of"):
        Int4Linear.from_float(w, group_size=16)
    with pytest.raises(ValueError, match="divisible by 8"):
        Int8Linear.from_float(torch.randn(8, 70))  # the kernel would read past the row (segfault)
    with pytest.raises(ValueError, match="0..15"):
        Int4Linear.from_codes(torch.full((16, 32), 16, dtype=torch.uint8), torch.ones(16, 1), torch.zeros(16, 1), 32)
    q = Int4Linear.from_float(w)
    with pytest.raises(ValueError, match="expected 96"):
        q(torch.randn(2, 64))
    with pytest.raises(ValueError, match="floating point"):
        q(torch.ones(2, 96, dtype=torch.long))
    assert q(torch.randn(0, 96)).shape == (0, 32)  # an empty batch is fine


def tiny(tie: bool, qkv_bias: bool = False, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    m = Llama(LlamaConfig(vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                          tie_embeddings=tie, qkv_bias=qkv_bias, max_seq_len=64)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return m


def dequantized_copy(q: Llama, float_model: Llama) -> Llama:
    """The float model with every quantized layer's Ŵ in place of its weight (the exact reference)."""
    ref = tiny(float_model.lm_head is None, float_model.cfg.qkv_bias)
    ref.load_state_dict(float_model.state_dict())
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QuantLinear) and name != "output_head":
                ref.get_submodule(name).weight.copy_(m.dequantize())
        head = ref.lm_head.weight if ref.lm_head is not None else None
        if head is not None:
            head.copy_(q.output_head.dequantize())
    return ref


@pytest.mark.parametrize("scheme,tie,bias", [("int8", True, False), ("int4", True, False), ("int4", False, True),
                                             ("int8", False, True)])
def test_quantize_model_tiny_llama_and_qwen2(scheme, tie, bias):
    model = tiny(tie, bias)
    float_model = tiny(tie, bias)
    quantize_model(model, scheme, group_size=32, compute_dtype=torch.float32, head=scheme)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.output_head, Int8Linear if scheme == "int8" else Int4Linear) and model.lm_head is None
    assert isinstance(model.tok_embeddings, nn.Embedding)  # the lookup stays float
    if bias:
        assert model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v bias kept
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(ids)
        if tie:  # tied: the reference's head is the embedding, so compare the head on its own
            ref_model = dequantized_copy(model, float_model)
            h = ref_model.norm(ref_model.tok_embeddings(ids))
            torch.testing.assert_close(model.output_head(h), F.linear(h, model.output_head.dequantize()),
                                       rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(got, dequantized_copy(model, float_model)(ids), rtol=1e-4, atol=1e-4)
        set_compute_dtype(model, torch.bfloat16)  # the fast kernels: close to the float model it came from
        assert rel_err(model(ids), float_model(ids)) < (0.05 if scheme == "int8" else 0.2)


def test_quantize_model_head_choice_and_atomic_failure():
    model = tiny(True)
    quantize_model(model, "int4")  # default head: int8
    assert isinstance(model.output_head, Int8Linear) and isinstance(model.layers[0].ffn.up_proj, Int4Linear)
    floaty = tiny(True)
    quantize_model(floaty, "int8", head="float")
    assert floaty.output_head is None
    bad = tiny(True)
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj: int4 group size 128 does not divide in_features 64"):
        quantize_model(bad, "int4", group_size=128)  # d_model = 64: groups of 128 fit the FFN's down_proj only
    assert not any(isinstance(m, QuantLinear) for m in bad.modules()) and bad.output_head is None  # untouched
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(bad, "int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_model(bad, "int4", group_size=48)
    assert quantize_model(bad, None) is bad
