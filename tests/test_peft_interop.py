"""Adapters interchangeable with HF PEFT: saved by one library, loaded by the other on the same base
model, the same logits (≤ 1e-4) — for every method both libraries have (LoRA, IA³, prompt tuning,
P-tuning, prefix tuning), on tiny random Llama and GPT-2 checkpoints made here."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.peft import (  # noqa: E402
    AdapterLoadError, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
    get_peft_model,
)

TOL = 1e-4
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (HF model, checkpoint dir)}."""
    out = {}
    for fam, make in (("llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))),
                      ("gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)))):
        torch.manual_seed(0)
        hf = make().eval()
        d = tmp_path_factory.mktemp(fam)
        hf.save_pretrained(d, safe_serialization=True)
        out[fam] = (hf, d)
    return out


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))

# (peft config, attnkit config, number of virtual tokens whose logits HF returns in front)
CASES = {
    "lora": (lambda fam: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["q_proj", "v_proj", "down_proj"] if fam == "llama" else ["c_attn", "c_fc"]),
             lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"] if fam == "llama"
                                    else ["q_proj", "v_proj", "ffn.up"]), 0),
    "ia3": (lambda fam: peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), lambda fam: IA3Config(), 0),
    "prompt": (lambda fam: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
               lambda fam: PromptTuningConfig(num_virtual_tokens=4), 4),
    "ptuning_mlp": (lambda fam: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
                    lambda fam: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16), 4),
    "ptuning_lstm": (lambda fam: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16,
                                                          encoder_reparameterization_type="LSTM"),
                     lambda fam: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16,
                                                     encoder_reparameterization_type="LSTM"), 4),
    "prefix": (lambda fam: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
               lambda fam: PrefixTuningConfig(num_virtual_tokens=4), 0),
    "prefix_mlp": (lambda fam: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                       encoder_hidden_size=16),
                   lambda fam: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16), 0),
}
PARAMS = [(fam, case) for fam in ("llama", "gpt2") for case in CASES]


def _hf_logits(pm, P: int) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS).logits[:, P:]


def _perturb(model: PeftModel) -> None:
    """Random adapter weights, so that a wrong mapping cannot pass (LoRA's B and IA³'s l start trivial)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("fam,case", PARAMS)
def test_peft_to_attnkit(bases, tmp_path, fam, case):
    hf, d = bases[fam]
    make_hf, _, P = CASES[case]
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(hf), make_hf(fam)).eval()
    pm.save_pretrained(tmp_path)
    ref = _hf_logits(pm, P)
    with torch.no_grad():
        base = hf(input_ids=IDS).logits
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the outputs: the comparison below means something
    ours = PeftModel.from_pretrained(load_hf_model(d), tmp_path).eval()
    with torch.no_grad():
        out = ours(IDS)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("fam,case", PARAMS)
def test_attnkit_to_peft(bases, tmp_path, fam, case):
    hf, d = bases[fam]
    _, make_ours, P = CASES[case]
    torch.manual_seed(2)
    ours = get_peft_model(load_hf_model(d), make_ours(fam)).eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        out = ours(IDS)
        with ours.disable_adapter():
            base = ours(IDS)
    assert (out - base).abs().max() > 1e-3
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    ref = _hf_logits(pm, P)
    assert (out - ref).abs().max() <= TOL


def test_gpt2_lora_on_fused_c_attn_keeps_the_scale(bases, tmp_path):
    """attnkit's q and v LoRAs of rank 4 become one c_attn LoRA of rank 8 with α doubled."""
    hf, d = bases["gpt2"]
    ours = get_peft_model(load_hf_model(d), LoraConfig(r=4, lora_alpha=8))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn"]
    assert cfg["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 8 for i in range(2)}
    assert cfg["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 16 for i in range(2)}


def test_load_errors(bases, tmp_path):
    hf, d = bases["llama"]
    with pytest.raises(AdapterLoadError, match="adapter_config.json: missing"):
        PeftModel.from_pretrained(load_hf_model(d), tmp_path)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_bias=True))
    pm.save_pretrained(tmp_path / "lora_bias")
    with pytest.raises(AdapterLoadError, match="lora_bias"):
        PeftModel.from_pretrained(load_hf_model(d), tmp_path / "lora_bias")
    # an adapter for the Llama does not fit the GPT-2
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    pm.save_pretrained(tmp_path / "llama_lora")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(load_hf_model(bases["gpt2"][1]), tmp_path / "llama_lora")
    (tmp_path / "llama_lora" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterLoadError, match="corrupt"):
        PeftModel.from_pretrained(load_hf_model(d), tmp_path / "llama_lora")
