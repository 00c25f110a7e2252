"""A 4-bit K/V cache's exact blocks (attnkit.engine.kv_tail): every query reads the keys and values of its own
block as q8_0 rows kept aside and earlier blocks as the q4_0 pool holds them. The engine must compute exactly that — checked
against the plain model attending under the same rule — whatever the chunking, the batch, the prefix cache or a
fork; and it must cost what it says in K/V memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import make_llm, random_prompts, tiny_llama

from attnkit.engine import SamplingParams
from attnkit.engine.kv_format import hadamard64, kv_format
from attnkit.engine.kv_tail import KVTail
from attnkit.kernels import library

pytestmark = pytest.mark.skipif(library() is None, reason="the C kernels are not built")
VOCAB = 320
BS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, d_model=256, n_heads=4, n_kv_heads=2, n_layers=2)  # hd 64: rows stored rotated


class ExactBlockReference:
    """The rule itself, for one forward over a whole sequence: query i sees keys j <= i, as q8_0 rows where j is in
    i's block, else as q4_0 rows (both Hadamard-rotated, as the pool stores them)."""

    attends = True

    def attend(self, q, k, v):
        fmt = kv_format("q4_0")
        q, k, v = hadamard64(q), hadamard64(k), hadamard64(v)
        T, g = k.shape[-2], q.shape[1] // k.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        own = (j // BS == i // BS) & (j <= i)
        kq, vq = (fmt.dequantize(fmt.quantize(x)) for x in (k, v))
        kx, vx = (kv_format("q8_0").dequantize(kv_format("q8_0").quantize(x)) for x in (k, v))
        kx, vx, kq, vq = (t.repeat_interleave(g, 1) for t in (kx, vx, kq, vq))
        s = torch.where(own, q @ kx.transpose(-1, -2), q @ kq.transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = torch.softmax(s.masked_fill(j > i, float("-inf")), -1)
        return hadamard64(torch.where(own, p, 0) @ vx + torch.where(~own, p, 0) @ vq)


@torch.inference_mode()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids]), cache=[ExactBlockReference() for _ in model.layers],
                   positions=torch.arange(len(ids)))
    return F.log_softmax(logits[0].float(), -1)  # (T, vocab)


def engine(model, **kw):
    cfg = {"block_size": BS, "kv_cache_bytes": 8 << 20, "kv_cache_dtype": "q4_0", "max_num_batched_tokens": 16} | kw
    return make_llm(model, **cfg)


PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1, prompt_logprobs=0)


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["rows-in-C", "chunks-in-PyTorch"])
def test_the_engine_computes_the_exact_block_rule(model, batch_invariant):
    llm = engine(model, batch_invariant=batch_invariant)
    assert llm.engine.runner.tail is not None
    prompts = random_prompts(6, VOCAB, 3, 40, seed=5)  # chunks of 16 rows, prompts ending mid-block, decodes
    for prompt, out in zip(prompts, llm.generate(prompts, PARAMS)):
        tokens = out.outputs[0].token_ids
        ref = reference_logprobs(model, prompt + tokens)
        got = torch.tensor([next(iter(d.values())) for d in out.prompt_logprobs[1:]])
        want = ref[:len(prompt) - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        gen = torch.tensor([lp[t] for lp, t in zip(out.outputs[0].logprobs, tokens)])
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
        torch.testing.assert_close(gen, ref[pos, torch.tensor(tokens)], rtol=1e-4, atol=1e-4)
        assert tokens == ref[pos].argmax(-1).tolist()


def test_without_exact_blocks_the_numbers_differ(model):
    """The rule is not a no-op: the plain q4_0 pool gives other logprobs (so the test above can fail)."""
    prompt = random_prompts(1, VOCAB, 30, 30, seed=6)
    a = engine(model).generate(prompt, PARAMS)[0]
    b = engine(model, kv_exact_blocks=False).generate(prompt, PARAMS)[0]
    la = torch.tensor([next(iter(d.values())) for d in a.prompt_logprobs[1:]])
    lb = torch.tensor([next(iter(d.values())) for d in b.prompt_logprobs[1:]])
    assert (la - lb).abs().max() > 1e-3


def test_alone_or_together_chunked_or_cached_the_tokens_are_the_same(model):
    prompts = random_prompts(10, VOCAB, 1, 50, seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [engine(model).generate([p], params)[0].outputs[0].token_ids for p in prompts]
    together = engine(model, max_num_batched_tokens=64).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in together] == alone
    # a second round on the same engine reuses every full block of each prompt from the prefix cache
    llm = engine(model)
    llm.generate(prompts, params)
    again = llm.generate(prompts, params)
    assert llm.engine.block_manager.stats().prefix_hits > 0
    assert [o.outputs[0].token_ids for o in again] == alone


def test_forked_completions_keep_their_blocks_rows(model):
    """n = 2 shares the prompt's partly written block; copy-on-write carries its tail rows along."""
    prompt = random_prompts(1, VOCAB, 10, 10, seed=8)[0]  # ends mid-block
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)
    outs = engine(model).generate([prompt], params)[0].outputs
    one = engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert outs[0].token_ids == outs[1].token_ids == one.outputs[0].token_ids


def test_the_slots_are_counted_as_kv_memory(model):
    llm = engine(model, kv_cache_bytes=4 << 20, max_num_seqs=8)
    tail, runner = llm.engine.runner.tail, llm.engine.runner
    assert tail.slots == 8 + 16 // BS + 1
    slot_bytes = KVTail.bytes_per_slot(len(model.layers), model.cfg.n_kv_heads, BS, model.cfg.hd)
    block_bytes = runner.bytes_per_block(model, BS, "q4_0")
    assert runner.k_pool.shape[2] == ((4 << 20) - tail.slots * slot_bytes) // block_bytes


def test_slots_that_would_crowd_out_the_pool_are_refused_by_name(model):
    with pytest.raises(ValueError, match=r"exact blocks of a q4_0 KV cache need 69 slots .* kv_exact_blocks=False"):
        engine(model, kv_cache_bytes=1 << 18, max_num_seqs=64, max_num_batched_tokens=16)
    assert engine(model, kv_cache_bytes=1 << 18, max_num_seqs=64, kv_exact_blocks=False).engine.runner.tail is None


def test_defaults(model):
    assert make_llm(model, kv_cache_dtype="q4_0").engine.config.block_size == 32  # KL 0.0240, not 0.0355 (docs)
    assert make_llm(model, kv_cache_dtype="q4_0").engine.runner.tail is not None
    assert make_llm(model, kv_cache_dtype="q8_0").engine.runner.tail is None  # q8_0 loses 0.05% without it
    assert make_llm(model, kv_cache_dtype="q8_0", kv_exact_blocks=True).engine.runner.tail is not None
    assert make_llm(model, kv_cache_dtype="float16").engine.config.block_size == 16
    assert make_llm(model, kv_cache_dtype="q4_0", kv_exact_blocks=False).engine.runner.tail is None
    with pytest.raises(ValueError, match=r"exact blocks need a quantized K/V cache \(got float16\)"):
        make_llm(model, kv_cache_dtype="float16", kv_exact_blocks=True)
    assert make_llm(tiny_llama(VOCAB, d_model=256, n_heads=4, n_kv_heads=2, attn_softcap=50.0), kv_cache_dtype="q4_0"
                    ).engine.runner.tail is None  # soft-capped scores: not for the C kernels, so no exact blocks
    chunked = make_llm(model, kv_cache_dtype="q4_0", batch_invariant=False).engine.runner
    assert chunked.tail is not None and not chunked.row_attention  # prompt chunks follow the rule in PyTorch


def test_slots_run_short_reads_fall_back_to_the_pool():
    """With every slot taken, a block gets none (-1) and its rows are read quantized; full and unheld blocks give
    theirs back first."""
    shape = KVTail.shape(1, 1, 2, BS, 64)
    t = KVTail(torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape, dtype=torch.uint8))
    held = {5, 6, 7}
    t.in_use = lambda b: b in held
    assert t.slot(5, 0) >= 0 and t.slot(6, 2) >= 0
    assert t.exact(6) == (t.slot_of[6], 2)
    assert t.slot(7, 0) == -1  # both held and partly written
    t.filled([5])
    assert t.slot(7, 0) >= 0 and 5 not in t.slot_of  # the full block's slot taken back
    held.discard(6)
    assert t.slot(8, 1) >= 0 and 6 not in t.slot_of  # the freed block's
    assert t.exact(9) == (-1, 0)


def test_the_command_line_flag():
    import argparse

    from attnkit.engine.options import InferenceOptions

    p = argparse.ArgumentParser()
    InferenceOptions.add_flags(p)
    for flag, want in (("auto", None), ("on", True), ("off", False)):
        args = p.parse_args(["--kv-cache-dtype", "q4_0", "--kv-exact-blocks", flag])
        assert InferenceOptions.from_args(args).engine_kv_exact_blocks() is want
    with pytest.raises(ValueError, match="kv_exact_blocks must be one of"):
        InferenceOptions(kv_exact_blocks="yes")
