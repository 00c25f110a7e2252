"""What the PEFT methods need to know about each model family attnkit loads.

Default targets per method (as HF PEFT's defaults for the same architectures), the shapes prefix
tuning needs, and the module names of the Hugging Face checkpoint, taken from the loader's own
name tables (:func:`attnkit.loading.hf.name_rules`), so that adapter files use HF PEFT's key names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..loading.hf import name_rules
from ..models.bert import Bert
from ..models.gpt2 import GPT2
from ..models.llama import Llama


@dataclass(frozen=True)
class Family:
    name: str
    causal: bool
    hf_prefix: str  # the transformers model's attribute holding the backbone ("model." for LlamaForCausalLM)
    lora_targets: tuple[str, ...]
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]


_LLAMA = Family("llama", True, "model.", ("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"), ("down_proj",))
_GPT2 = Family("gpt2", True, "transformer.", ("q_proj", "v_proj"), ("k_proj", "v_proj", "ffn.down"), ("ffn.down",))
_BERT = Family("bert", False, "", ("q_proj", "v_proj"), ("k_proj", "v_proj", "ffn.down"), ("ffn.down",))


def family_of(model: nn.Module) -> Family:
    for cls, fam in ((Llama, _LLAMA), (GPT2, _GPT2), (Bert, _BERT)):
        if isinstance(model, cls):
            return fam
    raise ValueError(f"PEFT supports attnkit's Llama, GPT2 and Bert models, not {type(model).__name__}")


def kv_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(n_layers, d_model, n_kv_heads, head_dim) of a model's attention."""
    from .tuner import innermost

    attn = innermost(model.layers[0].self_attn)  # type: ignore[index]
    return len(model.layers), model.cfg.d_model, attn.n_kv_heads, attn.head_dim  # type: ignore[union-attr, arg-type]


def hf_module_name(model: nn.Module, ours: str, prefix: str | None = None) -> tuple[str, int | None]:
    """The HF module name of attnkit module ``ours`` and, where HF fuses modules attnkit keeps apart, which part of
    the fused one's output rows ours is (GPT-2's ``c_attn``: 0 q, 1 k, 2 v; Phi-3's ``qkv_proj`` likewise and
    ``gate_up_proj``: 0 gate, 1 up); e.g. ``layers.0.ffn.gate_proj`` → (``model.layers.0.mlp.gate_proj``, None)."""
    _, rules, _, _ = name_rules(model.cfg)
    prefix = family_of(model).hf_prefix if prefix is None else prefix
    for pattern, template, transform in rules:
        m = re.fullmatch(pattern, ours + ".weight")
        if m:
            name = m.expand(template.replace("{p}", prefix)).removesuffix(".weight")
            fused = getattr(transform, "fused_part", None)  # rows of an HF module (attnkit.models.phi3)
            part = fused[1] if fused is not None else None
            if name.endswith("attn.c_attn"):
                part = "qkv".index(ours.rsplit(".", 1)[1][0])
            return name, part
    raise ValueError(f"no Hugging Face name for module {ours}")


def hf_name_table(model: nn.Module, prefix: str | None = None) -> dict[str, tuple[str, int | None]]:
    """Every Linear / sublayer of ``model`` → its HF name (see :func:`hf_module_name`)."""
    from .tuner import base_modules, clean_name, is_linear

    table = {}
    for name, module in base_modules(model):
        name = clean_name(name)
        if is_linear(module) and name.startswith("layers.") and name not in table:
            try:
                table[name] = hf_module_name(model, name, prefix)
            except ValueError:
                pass
    return table


def input_embeddings(model: nn.Module) -> nn.Embedding:
    emb = model.tok_embeddings
    assert isinstance(emb, nn.Embedding)
    return emb


def embed_scale(model: nn.Module) -> float:
    """The factor the model multiplies its token embeddings by (Gemma: √d_model; 1 for the others)."""
    return float(getattr(getattr(model, "cfg", None), "embed_scale", 1.0))


def embed_tokens(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) → what the model takes as ``inputs_embeds`` (B, T, d): the embedding rows times the
    model's embedding scale, as HF PEFT's ``word_embeddings(input_ids)`` (Gemma's scaled embedding module)."""
    x = input_embeddings(model)(idx)
    scale = embed_scale(model)
    return x if scale == 1.0 else x * torch.tensor(scale, dtype=x.dtype)


def param_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights counted once; a quantized linear layer's weight (buffers, not
    parameters: QLoRA's frozen base) counts its out × in weights."""
    from .tuner import is_linear

    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if is_linear(m) and not isinstance(m, nn.Linear):
            total += m.out_features * m.in_features
    return trainable, total


