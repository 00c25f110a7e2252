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
