"""Long-context RoPE variants against transformers' modeling_rope_utils: YaRN (Peng et al. 2023) and dynamic
NTK scaling (bloc97/emozilla) on tiny random Llama / Qwen2 / Qwen3 checkpoints made by transformers itself,
with a short original context so that the scaling changes every logit; LongRoPE is in test_family_phi3.py.

Each parity test has a negative control (the same model without the scaling, or without its attention
factor, must differ), so a scaling that silently does nothing cannot pass.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.errors import UnsupportedModelError  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.models.llama import rope_attention_factor, rotary_embedding  # noqa: E402
from attnkit.nn import RotaryEmbedding  # noqa: E402
from test_models_families import _randomize  # noqa: E402 (weights drawn wide: a wrong mapping shows)

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _load(ref, tmp_path):
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return load_hf_model(tmp_path)


def _unscaled(ours) -> None:
    """Negative control: the same model with plain RoPE."""
    ours.cfg.rope_scaling = None
    ours.rotary = rotary_embedding(ours.cfg)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 8.0, "beta_slow": 2.0, "truncate": False},
                                   {"attention_factor": 1.3}])
def test_llama_yarn_matches_transformers(tmp_path, extra):
    ref = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, rope_scaling={**YARN, **extra})))
    ours = _load(ref, tmp_path)
    assert ours.cfg.rope_scaling["rope_type"] == "yarn"
    want_af = extra.get("attention_factor", 0.1 * math.log(4.0) + 1)
    assert ours.rotary.attention_factor == pytest.approx(want_af)
    assert ref.model.rotary_emb.attention_scaling == pytest.approx(want_af)
    torch.testing.assert_close(ours.rotary.inv_freq, ref.model.rotary_emb.inv_freq, atol=1e-6, rtol=1e-6)
    ids = _ids(40)
    with torch.no_grad():
        want = ref(ids).logits
        assert want.abs().max() > 1.0
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        ours.rotary.attention_factor = 1.0  # negative control: the attention factor matters
        assert (ours(ids) - want).abs().max() > 1e-2
        _unscaled(ours)  # and so do the frequencies
        assert (ours(ids) - want).abs().max() > 1e-2


def test_yarn_mscale_pair_and_factor_from_lengths():
    """DeepSeek's mscale / mscale_all_dim ratio; factor None → max_position_embeddings / original (transformers)."""
    cfg = transformers.LlamaConfig(**BASE, rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 1.0})
    want_inv, want_af = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    from attnkit.loading.hf import model_config

    ours = model_config(cfg.to_dict(), None)
    assert rope_attention_factor(ours) == pytest.approx(want_af)
    torch.testing.assert_close(rotary_embedding(ours).inv_freq, want_inv, atol=1e-6, rtol=1e-6)
    d = cfg.to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 16}
    d.pop("rope_scaling", None)
    ours = model_config(d, None)
    assert rope_attention_factor(ours) == pytest.approx(0.1 * math.log(64 / 16) + 1)


def test_qwen2_and_qwen3_yarn(tmp_path):
    """Qwen2.5 / Qwen3 ship YaRN as {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}."""
    for i, (cls, cfg_cls, kw) in enumerate([
        (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
        (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {"head_dim": 32}),
    ]):
        ref = _randomize(cls(cfg_cls(**BASE, **kw, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16})))
        ours = _load(ref, tmp_path / str(i))
        ids = _ids(36)
        with torch.no_grad():
            want = ref(ids).logits
            torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
            _unscaled(ours)
            assert (ours(ids) - want).abs().max() > 1e-2


def test_llama_dynamic_ntk_matches_transformers(tmp_path):
    """Dynamic NTK: below max_position_embeddings plain RoPE, beyond it the base grows with the length.

    Every reference call runs on a fresh transformers model: its rotary embedding keeps the largest length
    seen so far (max_seq_len_cached), which attnkit's stateless one does not (see RotaryEmbedding)."""
    cfg = transformers.LlamaConfig(**{**BASE, "max_position_embeddings": 16},
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ref = _randomize(transformers.LlamaForCausalLM(cfg))
    ours = _load(ref, tmp_path)
    assert ours.rotary.length_dependent
    state = ref.state_dict()

    def fresh():
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(state)
        return m

    short, long = _ids(12), _ids(40)
    with torch.no_grad():
        torch.testing.assert_close(ours(short), fresh()(short).logits, atol=TOL, rtol=0)
        want = fresh()(long).logits
        torch.testing.assert_close(ours(long), want, atol=TOL, rtol=0)
        # the KV-cached loop: every step at its own length, as transformers' generate
        cache = ours.new_cache()
        steps = [ours(long[:, :10], cache=cache)] + [ours(long[:, t:t + 1], cache=cache) for t in range(10, 40)]
        ref_m, past, ref_steps = fresh(), None, []
        out = ref_m(long[:, :10], use_cache=True)
        ref_steps.append(out.logits)
        past = out.past_key_values
        for t in range(10, 40):
            out = ref_m(long[:, t:t + 1], cache=past, use_cache=True)
            ref_steps.append(out.logits)
            past = out.past_key_values
        torch.testing.assert_close(torch.cat(steps, 1), torch.cat(ref_steps, 1), atol=TOL, rtol=0)
        _unscaled(ours)  # negative control: beyond 16 tokens the dynamic base matters
        assert (ours(long) - want).abs().max() > 1e-2
        torch.testing.assert_close(ours(short), fresh()(short).logits, atol=TOL, rtol=0)  # and below it it does not


def test_engine_positions_are_per_position():
    """Explicit positions (the engine's packed rows): a length-dependent RoPE takes each position p at length
    p + 1, so a token's angles do not depend on the other positions of its batch."""
    rot = RotaryEmbedding(8, inv_freq=torch.ones(4), long_inv_freq=torch.full((4,), 0.5), long_after=10)
    pos = torch.tensor([3, 9, 10, 11, 2])
    cos, _ = rot.cos_sin(pos)
    alone = torch.cat([rot.cos_sin(p[None])[0] for p in pos])
    torch.testing.assert_close(cos, alone)
    torch.testing.assert_close(cos[2, :4], torch.cos(torch.full((4,), 5.0)))  # p = 10: length 11 > 10 → long
    torch.testing.assert_close(cos[1, :4], torch.cos(torch.full((4,), 9.0)))  # p = 9: length 10 → short
    cos_all, _ = rot.cos_sin(pos, seq_len=12)  # the model's own pass: one length for all
    torch.testing.assert_close(cos_all[0, :4], torch.cos(torch.full((4,), 1.5)))


@pytest.mark.parametrize("scaling, what", [({"rope_type": "dynamic"}, "factor"),
                                           ({"rope_type": "longrope", "short_factor": [1.0]}, "long_factor"),
                                           ({"rope_type": "mrope", "factor": 2.0}, "mrope")])
def test_bad_scaling_is_unsupported(tmp_path, scaling, what):
    import json

    cfg = transformers.LlamaConfig(**BASE).to_dict()
    cfg["rope_scaling"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=what):
        load_hf_model(tmp_path)


def test_llama_yarn_from_gguf_metadata(tmp_path):
    """llama.cpp's converter writes YaRN as rope.scaling.type yarn + factor + original_context_length (+ beta_fast /
    beta_slow / yarn_attn_factor where the checkpoint has them)."""
    import gguf
    from test_loading_gguf import IDS, tiny_hf, write_gguf  # the llama GGUF writer of the loader tests

    from attnkit.loading.gguf import load_gguf_model

    ref = tiny_hf(rope_scaling={**YARN, "beta_fast": 16.0})
    meta = {"rope_scaling_type": gguf.RopeScalingType.YARN, "rope_scaling_factor": 4.0, "rope_scaling_orig_ctx_len": 16,
            "rope_scaling_yarn_beta_fast": 16.0}
    path = write_gguf(tmp_path / "yarn.gguf", ref, "F32", meta_override=meta)
    ours = load_gguf_model(path)
    assert ours.cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                     "beta_fast": 16.0}
    with torch.no_grad():
        want = ref(IDS).logits
        torch.testing.assert_close(ours(IDS), want, atol=TOL, rtol=0)
        _unscaled(ours)
        assert (ours(IDS) - want).abs().max() > 1e-2
    bad = write_gguf(tmp_path / "bad.gguf", ref, "F32", meta_override={**meta, "rope_scaling_yarn_log_mul": 0.1})
    with pytest.raises(UnsupportedModelError, match="yarn_log_multiplier"):
        load_gguf_model(bad)
