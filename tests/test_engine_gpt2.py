"""GPT-2 on the engine: learned absolute positions at each packed token's own position, full multi-head
attention over the paged cache. Greedy outputs equal HF transformers' ``generate`` (batched, chunked
prefill, prefix hits, preemption) and attnkit's own full-recompute decoding."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from engine_helpers import greedy_reference, make_llm, random_prompts

from attnkit.engine import SamplingParams
from attnkit.loading.hf import load_hf_model
from attnkit.nn.fused import fuse_for_inference

VOCAB, N_NEW = 96, 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF GPT2LMHeadModel with random weights, attnkit's GPT2 loaded from its safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                  bos_token_id=0, eos_token_id=0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(4)  # sharper logits: fewer near-ties in argmax
    path = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, load_hf_model(path)


def _hf_greedy(ref, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_batched_greedy_equals_hf_generate(models, fuse):
    ref, ours = models
    prompts = random_prompts(12, VOCAB, lo=1, hi=60, seed=4)
    prompts += [prompts[0] + [5, 6, 7], prompts[1]]  # prefix-cache hits
    llm = make_llm(fuse_for_inference(ours) if fuse else ours, max_num_batched_tokens=48, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(ref, p)
    assert llm.engine.stats().prefix_hits > 0


def test_preemption_and_sampling_on_gpt2(models):
    _, ours = models
    prompts = random_prompts(6, VOCAB, lo=20, hi=40, seed=9)
    llm = make_llm(ours, block_size=4, num_blocks=30)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_reference(ours, p, 20)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    assert llm.generate(prompts[:2], seeded)[0].outputs[0].token_ids == llm.generate(prompts[:1], seeded)[0].outputs[0].token_ids


def test_positions_past_the_table_are_refused(models):
    _, ours = models
    llm = make_llm(ours)
    assert llm.engine.max_model_len == 256
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 300], SamplingParams(max_tokens=2))
