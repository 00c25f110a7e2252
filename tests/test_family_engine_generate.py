"""Every decoder family through the engine (paged KV, chunked prefill, continuous batching): greedy tokens equal
transformers' generate on the same tiny random checkpoint, 3 prompts × 24 tokens, prompts longer than the
sliding windows so that windowed layers (and their freed KV blocks) are exercised."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

FAMILIES = {
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **BASE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=20.0,
        final_logit_softcapping=15.0)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**BASE, "num_hidden_layers": 3}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**BASE, pad_token_id=0)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**BASE, **MOE)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **BASE, head_dim=16, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **BASE, num_experts=6, num_experts_per_tok=2, pad_token_id=0)),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    gemma = "Gemma" in type(model).__name__
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # Gemma's norms are (1 + w): w around 0
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_equals_transformers_generate(tmp_path, family):
    ref = _randomize(FAMILIES[family]())
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 13, 21)]
    llm = LLM.from_model(ours, None, EngineConfig(block_size=4, max_num_batched_tokens=8), eos_ids=set())
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == want, family
    assert llm.engine.stats().used_blocks == 0
