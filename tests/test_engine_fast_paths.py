"""The inference fast paths compute the same function as the plain blocks: fused projections,
decode attention by batched products, the paged (block-table) decode attention, the compiled step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnkit.engine import LLM, SamplingParams
from attnkit.engine.paged_attention import decode_attention, paged_decode_attention, write_kv
from attnkit.nn import MultiHeadAttention, SwiGLU
from attnkit.nn.fused import cat_out_features, fuse_for_inference

from engine_helpers import greedy_reference, tiny_llama


def test_fused_model_equals_unfused() -> None:
    for kw in ({}, {"qkv_bias": True}):  # Llama; Qwen2 (bias on q, k, v only)
        model = tiny_llama(**kw)
        if kw:
            with torch.no_grad():
                for layer in model.layers:
                    for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        p.bias.normal_()
        fused = fuse_for_inference(copy.deepcopy(model))
        assert fused.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.layers[0].self_attn, "q_proj")
        assert fused.layers[0].ffn.gate_up_proj is not None
        x = torch.randint(0, 320, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_is_idempotent_and_rejects_mixed_layers() -> None:
    mha = MultiHeadAttention(32, 4, 2)
    mha.fuse()
    w = mha.qkv_proj.weight.clone()
    mha.fuse()
    assert torch.equal(mha.qkv_proj.weight, w) and w.shape == (32 + 16 + 16, 32)
    with pytest.raises(TypeError, match="different types that are not all linear"):
        cat_out_features([torch.nn.Linear(4, 4), torch.nn.Identity()])
    with pytest.raises(ValueError, match="input size"):
        cat_out_features([torch.nn.Linear(4, 4), torch.nn.Linear(5, 4)])
    ffn = SwiGLU(16, 24)
    x = torch.randn(3, 16)
    ref = ffn(x)
    ffn.fuse()
    torch.testing.assert_close(ffn(x), ref)


def _reference(q, k, v, lens):
    """q (nh, B, hd), k/v (n_kv, B, L, hd): SDPA with K/V repeated per group and a padding mask."""
    nh, B, hd = q.shape
    n_kv, _, L, _ = k.shape
    kk = k.transpose(0, 1).repeat_interleave(nh // n_kv, dim=1)  # (B, nh, L, hd)
    vv = v.transpose(0, 1).repeat_interleave(nh // n_kv, dim=1)
    mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], kk, vv, attn_mask=mask)  # (B, nh, 1, hd)
    return out[:, :, 0].transpose(0, 1)


@pytest.mark.parametrize("n_kv,g", [(3, 3), (2, 1), (1, 4)])
def test_decode_attention_matches_sdpa(n_kv: int, g: int) -> None:
    torch.manual_seed(0)
    B, L, hd = 5, 37, 16
    q, k, v = torch.randn(n_kv * g, B, hd), torch.randn(n_kv, B, L, hd), torch.randn(n_kv, B, L, hd)
    lens = torch.tensor([37, 1, 20, 36, 5])
    bias = torch.zeros(B, L).masked_fill_(torch.arange(L)[None, :] >= lens[:, None], float("-inf"))
    torch.testing.assert_close(decode_attention(q, k, v, bias), _reference(q, k, v, lens), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_reads_through_block_tables() -> None:
    torch.manual_seed(1)
    n_kv, g, bs, hd, num_blocks = 2, 2, 4, 8, 20
    k_pool, v_pool = torch.zeros(n_kv, num_blocks, bs, hd), torch.zeros(n_kv, num_blocks, bs, hd)
    tables = torch.tensor([[7, 3, 12], [0, 19, 5]])  # scattered blocks
    lens = torch.tensor([10, 12])
    k, v = torch.randn(n_kv, 2, 12, hd), torch.randn(n_kv, 2, 12, hd)
    for b in range(2):  # write each sequence's tokens into its slots, as the engine does
        slots = torch.tensor([int(tables[b, i // bs]) * bs + i % bs for i in range(12)])
        write_kv(k_pool, v_pool, k[:, b], v[:, b], slots)
    q = torch.randn(n_kv * g, 2, hd)
    bias = torch.zeros(2, 12).masked_fill_(torch.arange(12)[None, :] >= lens[:, None], float("-inf"))
    ref = _reference(q, k, v, lens)
    torch.testing.assert_close(paged_decode_attention(q, k_pool, v_pool, tables, bias), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_greedy_tokens() -> None:
    """EngineConfig(compile=True): decode attention compiled over the block tables; outputs unchanged."""
    model = tiny_llama()
    prompts = [[5, 9, 33, 2], list(range(40, 75)), [7] * 18]
    want = [greedy_reference(model, p, 12) for p in prompts]
    llm = LLM.from_model(model, compile=True, block_size=8)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("hd,softcap", [(64, None), (64, 2.0), (128, 3.0), (24, 2.0)])
def test_native_paged_attention_matches_the_block_table_reference(hd, softcap) -> None:
    """The C kernel (attnkit.quant.native) reads K/V in place; a sliding window is a per-sequence start; soft-capped
    scores (Gemma 2) as decode_attention caps them, on the AVX-512 / AVX2 head sizes and the portable one (24)."""
    from attnkit.engine.paged_attention import paged_decode_attention_native
    from attnkit.kernels import library

    if library() is None:
        pytest.skip("no C compiler: the kernel could not be built")
    torch.manual_seed(3)
    n_kv, g, bs, num_blocks = 3, 3, 16, 50
    k_pool, v_pool = torch.randn(n_kv, num_blocks, bs, hd), torch.randn(n_kv, num_blocks, bs, hd)
    tables = torch.randint(0, num_blocks, (4, 6))
    lens, starts = torch.tensor([96, 1, 40, 77]), torch.tensor([0, 0, 10, 0])
    q = torch.randn(n_kv * g, 4, hd)
    j = torch.arange(6 * bs)[None]
    bias = torch.zeros(4, 6 * bs).masked_fill_((j >= lens[:, None]) | (j < starts[:, None]), float("-inf"))
    if softcap is not None:  # scores of a few units: the cap bends them
        q = q * 2
    t = torch.arange(6 * bs)
    blk, off = tables[:, t // bs], t % bs  # the sequences' K/V gathered for decode_attention's reference
    ref = decode_attention(q, k_pool[:, blk, off], v_pool[:, blk, off], bias, softcap=softcap)
    torch.testing.assert_close(paged_decode_attention(q, k_pool, v_pool, tables, bias),
                               decode_attention(q, k_pool[:, blk, off], v_pool[:, blk, off], bias), rtol=1e-5, atol=1e-5)
    got = paged_decode_attention_native(q, k_pool, v_pool, tables, lens, starts, softcap=softcap)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if softcap is not None:  # negative control: without the cap the outputs differ
        assert (paged_decode_attention(q, k_pool, v_pool, tables, bias) - got).abs().max() > 1e-2
    assert paged_decode_attention_native(q.double(), k_pool, v_pool, tables, lens, starts) is None  # float32 only


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64, 130])
def test_the_fused_ffn_writes_silu_times_up_over_its_own_gate_up_output(rows) -> None:
    """Inference (no grad): SiLU(gate)·up is written over gate_up's output from 64 rows (rows in blocks [r0, 2·r0));
    every row's values are exactly those of F.silu(gate) * up, and from 64 rows the result lies in gate_up's storage."""
    from attnkit.nn.ffn import silu_mul_over

    torch.manual_seed(rows)
    glu = SwiGLU(16, 24)
    glu.fuse()
    x = torch.randn(rows, 16)
    with torch.no_grad():
        gu = glu.gate_up_proj(x)
        gate, up = gu.chunk(2, dim=-1)
        want = F.silu(gate) * up
        h = silu_mul_over(gu)
        assert (h.data_ptr() == gu.data_ptr()) == (rows >= 64) and h.is_contiguous() and h.shape == (rows, 24)
        assert torch.equal(h, want)
        assert torch.equal(glu(x), glu.down_proj(want))
    y = glu(x.requires_grad_())  # training: out of place, so autograd keeps its inputs
    y.sum().backward()
    assert x.grad is not None and torch.equal(y.detach(), glu.down_proj(want).detach())
