"""The C prompt attention (kernels/prefill.c): a prompt chunk's causal attention a KV head and 16 positions at a
time, each row bit for bit what the C decode attention gives it as a decode query (the engine's batch invariance:
prompt rows are computed as decode rows would be), within float rounding of SDPA, and the same however the prompt
is cut into chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import make_llm, random_prompts, tiny_llama

from attnkit.engine import SamplingParams
from attnkit.engine.paged_attention import paged_decode_attention_native, prefill_attention_native, prefill_kernel_takes

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not prefill_kernel_takes(torch.float32, CPU, 8, 2, 64),
                                reason="the C prompt attention needs the kernels built with AVX-512")


def _as_decode_rows(q, k, v, dtype, bs=16):
    """q (1, nh, n, hd), k/v (1, nkv, ctx, hd) → the C decode attention of each query row at its position, over a
    paged pool of ``dtype`` whose blocks lie shuffled."""
    _, nh, n, hd = q.shape
    nkv, ctx = k.shape[1], k.shape[2]
    nb = -(-ctx // bs)
    perm = torch.randperm(nb + 2)[:nb]
    kp = torch.zeros(nkv, nb + 2, bs, hd, dtype=dtype)
    vp = torch.zeros_like(kp)
    for b in range(nb):
        rows = slice(b * bs, min(ctx, (b + 1) * bs))
        kp[:, perm[b], :rows.stop - rows.start] = k[0, :, rows]
        vp[:, perm[b], :rows.stop - rows.start] = v[0, :, rows]
    tables = perm[None].expand(n, nb).contiguous().long()
    lens = torch.arange(ctx - n + 1, ctx + 1).long()
    return paged_decode_attention_native(q[0].contiguous(), kp, vp, tables, lens, torch.zeros(n, dtype=torch.long),
                                         scale=hd ** -0.5)


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (8, 1, 128), (4, 4, 64), (16, 2, 128)])
@pytest.mark.parametrize("n,ctx", [(1, 1), (1, 40), (17, 17), (70, 70), (37, 101)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_each_row_equals_the_decode_attention_bit_for_bit(nh, nkv, hd, n, ctx, dtype):
    torch.manual_seed(nh * 1000 + n * 7 + ctx)
    q = torch.randn(1, nh, n, hd)
    k, v = torch.randn(1, nkv, ctx, hd).to(dtype), torch.randn(1, nkv, ctx, hd).to(dtype)
    got = prefill_attention_native(q, k, v, hd ** -0.5)
    assert got is not None and got.shape == q.shape
    assert torch.equal(got[0], _as_decode_rows(q, k, v, dtype))
    visible = torch.ones(n, ctx, dtype=torch.bool).tril_(ctx - n)
    ref = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=visible, enable_gqa=True)
    assert torch.allclose(got, ref, atol=2e-6, rtol=1e-5)


def test_a_prompt_cut_into_chunks_gets_the_same_bits():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 12, 90, 64), torch.randn(1, 4, 90, 64), torch.randn(1, 4, 90, 64)
    whole = prefill_attention_native(q, k, v, 0.125)
    parts = [prefill_attention_native(q[:, :, a:b], k[:, :, :b], v[:, :, :b], 0.125)
             for a, b in ((0, 1), (1, 33), (33, 34), (34, 90))]
    assert torch.equal(whole, torch.cat(parts, dim=2))


def test_what_it_does_not_take_is_refused():
    assert not prefill_kernel_takes(torch.float32, CPU, 8, 2, 96)  # head dim 96 (Phi-3)
    assert not prefill_kernel_takes(torch.float32, CPU, 18, 2, 64)  # 9 query heads a KV head
    assert not prefill_kernel_takes(torch.bfloat16, CPU, 8, 2, 64)
    assert prefill_attention_native(torch.randn(1, 8, 5, 96), torch.randn(1, 2, 5, 96), torch.randn(1, 2, 5, 96), 1.) is None
    assert prefill_attention_native(torch.randn(1, 8, 6, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64), 1.) is None


@pytest.mark.parametrize("kv", [{}, {"kv_cache_dtype": "q8_0"}, {"kv_cache_dtype": "q4_0", "kv_exact_blocks": False}])
def test_the_engine_gets_the_same_prompt_logprobs_with_and_without_it(kv):
    """A model with 64-wide heads takes the kernel for its prompt chunks; prompt logprobs (every prompt row's
    logits) through chunked prefill and a cached prefix equal, bit for bit, those of prompt rows run as decode rows
    (over a float pool, and over quantized rows, rotated, which the kernel reads dequantized as the decode does)."""
    model = tiny_llama(320, seed=3, d_model=128, n_heads=2, n_kv_heads=1)
    prompts = random_prompts(5, 320, lo=2, hi=90, seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=3, ignore_eos=True)
    runs = []
    for kernel in (True, False):
        llm = make_llm(model, max_num_batched_tokens=40, block_size=16, **kv)
        assert llm.engine.runner.prompt_kernel and llm.engine.runner.row_attention
        llm.engine.runner.prompt_kernel = kernel
        llm.generate(prompts[:1], SamplingParams(max_tokens=1))  # the first prompt's blocks in the prefix cache
        runs.append(llm.generate(prompts, params))
    for a, b in zip(*runs):
        assert a.prompt_logprobs == b.prompt_logprobs and a.token_ids == b.token_ids
