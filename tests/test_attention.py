"""Scaled dot-product attention: the written-out equation, torch's SDPA, masks, GQA/MQA, bad input."""

import math

import pytest
import torch

from attnkit.nn import MultiHeadAttention, causal_mask, combine_masks, lengths_mask, scaled_dot_product_attention

torch.manual_seed(0)


def reference_attention(q, k, v, allowed):
    """Loop over (batch, head, query) with the paper's formula and Python floats."""
    B, H, Tq, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                logits = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) if allowed[b, h, i, j] else -math.inf
                          for j in range(k.shape[2])]
                m = max(logits)
                if m == -math.inf:
                    continue
                w = [math.exp(x - m) for x in logits]
                s = sum(w)
                out[b, h, i] = sum((wj / s) * v[b, h, j] for j, wj in enumerate(w))
    return out


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_matches_the_equation_with_causal_and_padding_masks(impl):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = combine_masks(causal_mask(5)[None, None], lengths_mask(torch.tensor([5, 3]), 5))
    got, _ = scaled_dot_product_attention(q, k, v, mask=mask, impl=impl)
    want = reference_attention(q, k, v, mask.expand(2, 3, 5, 5))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_math_and_sdpa_agree_with_bias_and_gqa():
    q, k, v = torch.randn(2, 8, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    bias = torch.randn(1, 8, 7, 9)
    mask = lengths_mask(torch.tensor([9, 4]), 9)
    a, _ = scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, impl="math")
    b, _ = scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, impl="sdpa")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_fully_masked_rows_give_zeros_not_nan(impl):
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 may attend nowhere
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask, impl=impl)
    assert not torch.isnan(out).any()
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    assert out[..., 1, :].abs().sum() > 0


def test_fully_masked_rows_have_finite_gradients():
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, True]])
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask, impl="math")
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_weights_are_a_distribution_and_respect_the_mask():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    _, w = scaled_dot_product_attention(q, k, v, mask=causal_mask(6), need_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6))
    assert torch.all(w.masked_select(~causal_mask(6)) == 0)


def test_grouped_query_equals_multi_head_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa = MultiHeadAttention(32, n_heads=8, n_kv_heads=2, bias=False)
    mha = MultiHeadAttention(32, n_heads=8, bias=False)
    hd = 4
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            w = src.weight.view(2, hd, 32)  # (n_kv, hd, d)
            dst.weight.copy_(w.repeat_interleave(4, dim=0).reshape(32, 32))  # each kv head serves 4 q heads
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(gqa(x, mask=causal_mask(5)), mha(x, mask=causal_mask(5)), atol=1e-6, rtol=1e-6)
    assert gqa.k_proj.weight.shape == (8, 32)  # 2 kv heads × 4 dims: 4× fewer K/V parameters


def test_multi_query_attention_runs_and_is_causal():
    mqa = MultiHeadAttention(16, n_heads=4, n_kv_heads=1)
    x = torch.randn(1, 6, 16)
    y = mqa(x, mask=causal_mask(6))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)
    torch.testing.assert_close(mqa(x2, mask=causal_mask(6))[:, :4], y[:, :4])


def test_bad_input_errors_name_the_problem():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="head_dim"):
        scaled_dot_product_attention(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(TypeError, match="dtypes differ"):
        scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"\(B, n_heads, T, head_dim\)"):
        scaled_dot_product_attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, q, q, mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(32, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, n_heads=8)
    with pytest.raises(ValueError, match=r"\(B, T, d_model\)"):
        MultiHeadAttention(16, 4)(torch.randn(16))


def _assert_matches_float64_sdpa(out, leaves, qkv, d_out, mask, bias, dtype) -> torch.Tensor:
    """``out`` and its leaves' gradients (after ``out.backward(d_out)``) against torch's SDPA in float64 with the same
    mask and bias, scale 0.3, rows with no key zero; returns the float64 output."""
    ref_leaves = [t.double().detach().requires_grad_() for t in qkv]
    add = bias if mask is None or bias is not None else torch.zeros(mask.shape, dtype=torch.float64)
    if mask is not None:
        add = add.masked_fill(~mask, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=add, scale=0.3, enable_gqa=True)
    if mask is not None:
        ref = ref.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    ref.backward(d_out.double())
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(leaves, ref_leaves):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)
    return ref


@pytest.mark.parametrize("chunk", [None, 3 * 7 * 9, 3 * 2 * 9, 1, "pieces"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_by_batched_products_matches_float64_sdpa(monkeypatch, dtype, chunk):
    """Training on the CPU takes bmm_attention (P recomputed in the backward): output and the gradients of q, k, v
    against torch's SDPA in float64, with GQA, bias, a padding mask and a query row that may attend nowhere; in one
    chunk, in chunks of one batch row and one GQA group, of a group and two query rows, of a group and one row, and
    in pieces of two query rows that take only the keys their rows may attend (a per-head bias: not the C tiles)."""
    from attnkit.nn import bmm_attention as bmm_module

    if chunk == "pieces":
        monkeypatch.setattr(bmm_module, "QUERY_ROWS", 2)
        spans = bmm_module._key_spans(torch.zeros(2, 1, 7, 9).masked_fill(~causal_mask(7, 9), float("-inf")), 7, 9)
        assert spans == [(0, 4), (0, 6), (0, 8), (0, 9)]  # rows 0-1 see keys 0..3 (causal with 2 keys of past)
    elif chunk is not None:
        monkeypatch.setattr(bmm_module, "CHUNK_SCORES", chunk)
        n = len(bmm_module._chunks(torch.empty(2, 6, 7, 16), torch.empty(2, 2, 9, 16)))
        assert n == {3 * 7 * 9: 4, 3 * 2 * 9: 2 * 2 * 4, 1: 2 * 2 * 7}[chunk]

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 7, 16, generator=g)
    k, v = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    bias, d_out = torch.randn(1, 6, 7, 9, generator=g), torch.randn(2, 6, 7, 16, generator=g)
    mask = lengths_mask(torch.tensor([9, 4]), 9).expand(2, 1, 7, 9).clone()
    mask[1, :, 3] = False  # a query row with no key: zeros and zero gradients, never NaN
    if chunk == "pieces":
        mask &= causal_mask(7, 9)
    calls = []
    real = bmm_module._BmmAttention.apply
    bmm_module._BmmAttention.apply = lambda *a: calls.append(1) or real(*a)
    try:
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out, _ = scaled_dot_product_attention(*leaves, mask=mask, bias=bias, impl="sdpa", scale=0.3)
        out.backward(d_out.to(dtype))
    finally:
        bmm_module._BmmAttention.apply = real
    assert calls, "a training forward on the CPU should take bmm_attention"
    ref = _assert_matches_float64_sdpa(out, leaves, (q, k, v), d_out, mask, bias.double(), dtype)
    assert torch.equal(out[1, :, 3], torch.zeros_like(out[1, :, 3]))
    with torch.no_grad():  # inference keeps torch's fused kernel
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, impl="sdpa", scale=0.3)[0],
                                   ref.float(), atol=2e-5, rtol=2e-5)


def _tiled_available(dtype: torch.dtype) -> bool:
    from attnkit.nn.train_attention import _tiled_kernels

    t = torch.empty(1, 1, 1, 16, dtype=dtype)
    return _tiled_kernels(t, t, t, None) is not None


def _doc_causal(doc: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): causal within each row's documents (packed training rows)."""
    T = doc.shape[1]
    return (torch.ones(T, T, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :]))[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kind", [((2, 6, 2, 37, 16), "causal"), ((2, 4, 2, 150, 64), "packed"),
                                        ((1, 4, 4, 70, 128), "padding"), ((2, 2, 1, 5, 32), "none")])
def test_training_attention_in_c_tiles_matches_float64_sdpa(monkeypatch, dtype, shape, kind):
    """Training attention on a 512-bit CPU takes the C kernels' tiles (kernels/train_attention.c): output and the
    gradients of q, k, v against torch's SDPA in float64 — GQA, odd lengths, head sizes 16 to 128, causal, packed
    documents, padding with a query row that may attend nowhere, and no mask."""
    from attnkit.nn import train_attention as tiled_module

    if not _tiled_available(dtype):
        pytest.skip("no 512-bit C kernels for this dtype on this machine")
    B, nh, nkv, T, D = shape
    g = torch.Generator().manual_seed(5)
    q, k, v, d_out = (torch.randn(B, n, T, D, generator=g) for n in (nh, nkv, nkv, nh))
    if kind == "causal":
        mask = causal_mask(T)[None, None].expand(B, 1, T, T)
    elif kind == "packed":
        mask = _doc_causal(torch.randint(0, 4, (B, T), generator=g).sort(-1).values)
    elif kind == "padding":
        mask = lengths_mask(torch.tensor([50]), T).expand(B, 1, T, T).clone()
        mask[:, :, 3] = False
    else:
        mask = None
    calls = []
    real = tiled_module._TiledAttention.apply
    monkeypatch.setattr(tiled_module._TiledAttention, "apply", lambda *a: calls.append(1) or real(*a))
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    out, _ = scaled_dot_product_attention(*leaves, mask=mask, impl="sdpa", scale=0.3)
    out.backward(d_out.to(dtype))
    assert calls, "a 512-bit CPU's training forward should take the C tiles"
    _assert_matches_float64_sdpa(out, leaves, (q, k, v), d_out, mask, None, dtype)
    if kind == "padding":
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_tiles_skip_keys_no_row_attends(dtype):
    """A tile of keys that every row's mask excludes is never read: NaN values there leave output and gradients
    finite and equal to attention over the other keys alone (the batched products would multiply them by P = 0)."""
    from attnkit.nn.train_attention import train_attention

    if not _tiled_available(dtype):
        pytest.skip("no 512-bit C kernels for this dtype on this machine")
    g = torch.Generator().manual_seed(6)
    q, k, v, d_out = (torch.randn(1, 2, 64, 32, generator=g) for _ in range(4))
    k2, v2 = torch.cat([k, torch.full_like(k, float("nan"))], 2), torch.cat([v, torch.full_like(v, float("nan"))], 2)
    keys = lengths_mask(torch.tensor([64]), 128)  # keys 64..127 masked for every row: a whole tile of 64
    add = torch.zeros(1, 1, 64, 128).masked_fill(~keys, float("-inf"))
    got = [t.to(dtype).detach().requires_grad_() for t in (q, k2, v2)]
    out = train_attention(*got, add, 0.2)
    out.backward(d_out.to(dtype))
    want = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    ref = train_attention(*want, None, 0.2)
    ref.backward(d_out.to(dtype))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(got[0].grad, want[0].grad, atol=0, rtol=0)
    torch.testing.assert_close(got[1].grad[:, :, :64], want[1].grad, atol=0, rtol=0)
    assert torch.equal(got[2].grad[:, :, 64:], torch.zeros_like(got[2].grad[:, :, 64:]))
