"""Reference parity of the model families: tiny random checkpoints made and saved by transformers
itself, loaded by attnkit, compared logit by logit (in the spirit of minGPT's test_huggingface_import).

Weights are re-drawn with a large standard deviation so that every parameter visibly moves the
output (with transformers' default init of std 0.02 the logits are ~1e-2 and a wrong mapping
could hide under the tolerance); each test also has a negative control that must fail.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.models.bert import SentenceEncoder, mean_pool  # noqa: E402
from attnkit.models.llama import Llama  # noqa: E402

TOL = 1e-4


def _randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def _ids(vocab: int, B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


LLAMA3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16})


def test_llama3_rope_scaling_gqa_untied(tmp_path):
    ref = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA3, rope_theta=500000.0)))
    ours = load_hf_model(_save(ref, tmp_path))
    assert isinstance(ours, Llama) and ours.cfg.n_kv_heads == 2 and not ours.cfg.tie_embeddings
    assert ours.cfg.rope_scaling["rope_type"] == "llama3"
    ids = _ids(128)
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # negative control: without the frequency scaling the logits differ
    ours.cfg.rope_scaling = None
    from attnkit.models.llama import rope_inv_freq

    ours.rotary.inv_freq = rope_inv_freq(ours.cfg).float()
    with torch.no_grad():
        assert (ours(ids) - want).abs().max() > 1e-2


def test_qwen2_qkv_bias_tied(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ref = _randomize(transformers.Qwen2ForCausalLM(cfg))
    ours = load_hf_model(_save(ref, tmp_path))
    assert ours.cfg.qkv_bias and not ours.cfg.o_bias and ours.cfg.tie_embeddings and ours.lm_head is None
    ids = _ids(128)
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        ours.layers[0].self_attn.k_proj.bias.zero_()  # negative control: the biases matter
        assert (ours(ids) - want).abs().max() > 1e-2


def test_mistral_sliding_window(tmp_path):
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, sliding_window=5)
    ref = _randomize(transformers.MistralForCausalLM(cfg))
    ours = load_hf_model(_save(ref, tmp_path))
    assert ours.cfg.sliding_window == 5
    ids = _ids(128, T=20)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        # the KV-cached path (prefill then one token at a time) applies the same window
        cache = ours.new_cache()
        steps = [ours(ids[:, :7], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=TOL, rtol=0)
        ours.cfg.sliding_window = None  # negative control: full causal attention differs
        assert (ours(ids) - want).abs().max() > 1e-2


def test_gpt2_fused_qkv_conv1d(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    ref = _randomize(transformers.GPT2LMHeadModel(cfg), std=0.2)
    ours = load_hf_model(_save(ref, tmp_path))
    ids = _ids(128)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        cache = ours.new_cache()  # learned positions continue at the cache offset
        steps = [ours(ids[:, :10], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(10, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=TOL, rtol=0)


def test_llama_kv_cache_matches_full_forward(tmp_path):
    ref = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA3)))
    ours = load_hf_model(_save(ref, tmp_path))
    ids = _ids(128, B=1, T=30)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        steps = [ours(ids[:, :11], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(11, 30)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=0)
        last = ours(ids, last_only=True)
        torch.testing.assert_close(last, full[:, -1:], atol=TOL, rtol=0)


def test_sharded_safetensors(tmp_path):
    ref = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA3)))
    _save(ref, tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_hf_model(tmp_path)
    ids = _ids(128)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=TOL, rtol=0)


def test_bert_hidden_states_and_mean_pooling(tmp_path):
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    ref = _randomize(transformers.BertModel(cfg, add_pooling_layer=True), std=0.2)
    ours = load_hf_model(_save(ref, tmp_path))
    ids = _ids(128, B=3, T=12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], atol=TOL, rtol=0)
        # sentence-transformers' mean pooling + Normalize, written out independently
        m = mask[..., None].float()
        st = torch.nn.functional.normalize((want * m).sum(1) / m.sum(1), dim=-1)
        torch.testing.assert_close(SentenceEncoder(ours, "mean", True)(ids, mask, types), st, atol=TOL, rtol=0)
        assert not torch.allclose(mean_pool(got, mask), got.mean(1), atol=1e-3)  # padding is excluded
