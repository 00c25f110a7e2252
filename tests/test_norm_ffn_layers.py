"""Norms, feed-forward networks and the Add & Norm residual blocks."""

import pytest
import torch
from torch import nn

from attnkit.nn import FeedForward, LayerNorm, RMSNorm, SwiGLU, TransformerLayer, causal_mask, make_ffn


def test_layernorm_and_rmsnorm_formulas():
    x = torch.randn(3, 5, 16)
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.uniform_()
        ln.bias.uniform_()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)
    ref = nn.LayerNorm(16)
    ref.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), ref(x))

    rms = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.uniform_()
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight)
    torch.testing.assert_close(rms(x.bfloat16()).float(), rms(x), atol=3e-2, rtol=3e-2)


def test_ffn_formulas():
    x = torch.randn(2, 4, 8)
    ffn = FeedForward(8, 32, "relu")
    torch.testing.assert_close(ffn(x), ffn.down(torch.relu(ffn.up(x))))
    glu = SwiGLU(8, 32)
    torch.testing.assert_close(glu(x), glu.down_proj(nn.functional.silu(glu.gate_proj(x)) * glu.up_proj(x)))
    assert isinstance(make_ffn("gelu", 8, 32), FeedForward)
    with pytest.raises(ValueError, match="unknown activation"):
        make_ffn("tanhh", 8, 32)


@pytest.mark.parametrize("norm_first", [False, True])
def test_add_and_norm_order(norm_first):
    layer = TransformerLayer(16, 4, 32, norm_first=norm_first, norm="rmsnorm", ffn="swiglu", bias=False).eval()
    x = torch.randn(2, 5, 16)
    a = layer.self_attn(layer.norm1(x) if norm_first else x, mask=causal_mask(5))
    h = x + a if norm_first else layer.norm1(x + a)
    want = h + layer.ffn(layer.norm2(h)) if norm_first else layer.norm2(h + layer.ffn(h))
    torch.testing.assert_close(layer(x, mask=causal_mask(5)), want)


def test_swiglu_product_keeps_two_tensors_and_autograd_gradients():
    from attnkit.nn.ffn import silu_mul

    g = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (g, u))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = silu_mul(g, u)
    assert len(saved) == 2 and saved[0] is g and saved[1] is u  # SiLU(g) is recomputed, not kept
    torch.testing.assert_close(h, torch.nn.functional.silu(g) * u)


def _train_kernels_here() -> bool:
    from attnkit.kernels import train_kernels

    return train_kernels() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ff", [48, 37])
def test_swiglu_in_c_matches_pytorch_forward_and_backward(dtype, ff):
    """A training step's SwiGLU on a 512-bit CPU runs in C (kernels/train_ops.c): output and both gradients against
    PyTorch's ops in float64 (a width with a partial vector too); bf16 within its rounding."""
    from attnkit.nn import ffn

    if not _train_kernels_here():
        pytest.skip("no 512-bit training kernels here")
    g0, u0, dh = (torch.randn(3, 5, ff, generator=torch.Generator().manual_seed(s)) * 3 for s in range(3))
    g, u = g0.to(dtype).requires_grad_(), u0.to(dtype).requires_grad_()
    assert ffn._swiglu_kernels(g, u) is not None
    h = ffn.silu_mul(g, u)
    h.backward(dh.to(dtype))
    gr, ur = (t.detach().to(dtype).double().requires_grad_() for t in (g0, u0))
    want = torch.nn.functional.silu(gr) * ur
    want.backward(dh.to(dtype).double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for got, ref in ((h, want), (g.grad, gr.grad), (u.grad, ur.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,offset,train_w", [(64, 0.0, False), (37, 1.0, True)])
def test_rmsnorm_in_c_matches_pytorch_forward_and_backward(dtype, d, offset, train_w):
    """A training step's RMSNorm on a 512-bit CPU runs in C: output (in the autocast dtype), ∂x and ∂γ against the
    formula in float64, with Gemma's (1 + γ) and a width with a partial vector."""
    from attnkit.nn import norm as norm_module

    if not _train_kernels_here():
        pytest.skip("no 512-bit training kernels here")
    g = torch.Generator().manual_seed(4)
    layer = RMSNorm(d, eps=1e-5, offset=offset)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d, generator=g))
    layer.weight.requires_grad_(train_w)
    x0, dy = torch.randn(4, 6, d, generator=g) * 2, torch.randn(4, 6, d, generator=g)
    x = x0.clone().requires_grad_()
    calls = []
    real = norm_module._RMSNormC.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(norm_module._RMSNormC, "apply", lambda *a: calls.append(1) or real(*a))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer(x)
    assert calls and y.dtype == dtype
    y.backward(dy.to(dtype))
    xr, wr = x0.double().requires_grad_(), layer.weight.detach().double().requires_grad_()
    want = xr * torch.rsqrt(xr.square().mean(-1, keepdim=True) + 1e-5) * (wr + offset)
    want.backward(dy.to(dtype).double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    if train_w:
        torch.testing.assert_close(layer.weight.grad.double(), wr.grad, rtol=1e-5, atol=1e-4)
    else:
        assert layer.weight.grad is None
