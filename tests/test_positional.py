"""Positional encodings against their papers' formulas and reference implementations."""

import math

import pytest
import torch

from attnkit.nn import (
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    causal_mask,
    sinusoidal_table,
    t5_relative_bucket,
)


def test_sinusoidal_matches_the_paper_formula():
    d, L = 16, 50
    pe = sinusoidal_table(L, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.zeros(1, 5, d)
    torch.testing.assert_close(SinusoidalPositionalEncoding(d)(x, offset=3)[0], pe[3:8])
    with pytest.raises(ValueError, match="even"):
        sinusoidal_table(4, 7)


def reference_rope(x, pos, base=10000.0):
    """Pairs (x_i, x_{i+d/2}) as complex numbers, multiplied by e^{i·pos·θ_i}."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(theta), pos * theta)
    return torch.cat([z.real, z.imag], -1).float()


def test_rope_matches_reference_rotation_and_is_relative():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    positions = torch.tensor([0, 1, 2, 10, 100])
    rq, rk = rope(q, k, positions)
    for t, p in enumerate(positions.tolist()):
        torch.testing.assert_close(rq[0, :, t], reference_rope(q[0, :, t], p), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rk[0, :, t], reference_rope(k[0, :, t], p), atol=1e-5, rtol=1e-5)
    # q_m · k_n depends only on m − n
    a, b = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = []
    for m, n in ((5, 2), (13, 10), (103, 100)):
        qa, _ = rope(a, a, torch.tensor([m]))
        _, kb = rope(b, b, torch.tensor([n]))
        dots.append(float((qa * kb).sum()))
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)


def test_rope_batched_positions_and_partial_rotary():
    rope = RotaryEmbedding(8, rotary_dim=4)
    q = torch.randn(2, 2, 3, 8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    rq, _ = rope(q, q, pos)
    assert torch.equal(rq[..., 4:], q[..., 4:])  # the pass-through half is untouched
    one, _ = RotaryEmbedding(8, rotary_dim=4)(q[1:], q[1:], pos[1])
    torch.testing.assert_close(rq[1:], one)


@pytest.mark.parametrize("hd,rd", [(64, 64), (128, 128), (96, 72), (8, 4)])
def test_rope_in_place_on_the_c_kernel_is_torchs_bit_for_bit(hd, rd):
    """Inference rotates a prompt's q and k heads in place, in one pass of C (kernels/rope.c) where the kernels are
    built: bit for bit rotate()'s x·cos + rotate_half(x)·sin (each product rounded, no FMA), the heads beyond
    (v) and the features past rotary_dim untouched; with gradients, out of place as before."""
    rope = RotaryEmbedding(hd, rotary_dim=rd, base=500000.0)
    bound = rope.at(torch.arange(1000, 1037))
    qkv = torch.randn(1, 37, 7, hd) * 4  # 5 q/k heads, then 2 v heads
    want = bound.rotate_heads(qkv[:, :, :5])
    with torch.inference_mode():
        x = qkv.clone()
        got = bound.rotate_heads(x[:, :, :5], inplace=True)
    assert torch.equal(got, want) and torch.equal(x[:, :, 5:], qkv[:, :, 5:])
    from attnkit.kernels import library

    assert (got.data_ptr() == x.data_ptr()) == (library() is not None)  # rotated where it lay
    assert not torch.equal(want, qkv[:, :, :5])


def test_alibi_slopes_match_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(16).tolist() == pytest.approx([2 ** -(0.5 * (i + 1)) for i in range(16)])
    # 6 heads: slopes of 4 heads, then every other slope of 8 heads (the paper's reference code)
    assert alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    bias = alibi_bias(8, 4)
    assert bias.shape == (1, 8, 4, 4)
    assert bias[0, 0, 3, 0].item() == pytest.approx(-0.5 * 3)  # −m·(i − j)
    assert bias[0, 7, 3, 3].item() == 0.0
    # with a cache the queries are the last positions
    torch.testing.assert_close(alibi_bias(8, 1, 4)[0, :, 0], alibi_bias(8, 4)[0, :, 3])


def test_t5_buckets_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        torch.testing.assert_close(t5_relative_bucket(rel, bidirectional, 32, 128), want)


def test_t5_bias_module_shape_and_cache_offset():
    rb = T5RelativePositionBias(n_heads=4, bidirectional=False)
    full = rb(6)
    assert full.shape == (1, 4, 6, 6)
    torch.testing.assert_close(rb(1, 6)[0, :, 0], full[0, :, 5])
    assert causal_mask(6).shape == (6, 6)
