"""Writing an attnkit Llama (e.g. a distilled student) as a Hugging Face directory that
``attnkit generate --model DIR`` and transformers both load: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json. Tensor names come from the loader's table (inverted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..loading.hf import make_plan, name_rules
from ..models.llama import Llama


def save_hf_llama(model: Llama, tokenizer: Any, directory: str | Path) -> Path:
    cfg = model.cfg
    family = cfg.extra.get("family")
    if family not in (None, "llama", "mistral", "qwen2"):
        raise ValueError(f"save_hf_llama writes Llama/Mistral/Qwen2 checkpoints, not {family} "
                         "(its config.json fields and fused tensors differ)")
    if cfg.rope_freq_factors is not None:
        raise ValueError("per-frequency RoPE factors (GGUF rope_freqs) have no config.json field")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _, rules, _, _ = name_rules(cfg)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    plan = make_plan({k: v.shape for k, v in state.items()}, rules, "model.", lambda s: torch.empty(0))
    save_file({plan[k][0]: v.detach().float().contiguous() for k, v in state.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "model_type": cfg.extra.get("model_type", "llama"), "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias, "hidden_act": "silu",
    }
    (d / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.tk.save(str(d / "tokenizer.json"))
    tc = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
          "chat_template": tokenizer.chat_template}
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return d
