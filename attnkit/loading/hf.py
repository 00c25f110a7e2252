"""Hugging Face checkpoint directories: config.json + safetensors (single or sharded), no pickle.

``model.safetensors``, or ``model.safetensors.index.json`` whose ``weight_map`` names the shard of
each tensor. Tensors are read with ``safetensors.safe_open`` (a JSON header and raw bytes). The
per-family tables below map attnkit's parameter names to the checkpoint's.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models.bert import Bert, BertConfig
from ..models.gpt2 import GPT2, GPT2Config
from ..models.llama import ROPE_TYPES, Llama, LlamaConfig, rotary_embedding
from ..parallel.tensor import TensorParallel
from .common import Plan, check_leftovers, check_present, expected_shapes, materialize
from .errors import ModelLoadError, UnsupportedModelError

from ..models import registry


def supported_types() -> tuple[str, ...]:
    """Every config.json model_type attnkit loads: the registered decoder families', GPT-2 and BERT."""
    return (*registry.hf_types(), "gpt2", "bert")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(path, f"cannot read JSON ({e})") from e


# -- config.json → config ---------------------------------------------------------------------
def model_config(c: dict[str, Any], file: Path) -> LlamaConfig | GPT2Config | BertConfig:
    mt = c.get("model_type")
    family = registry.by_hf_type(mt) if isinstance(mt, str) else None
    if family is None and mt not in ("gpt2", "bert"):
        raise UnsupportedModelError(file, f"model_type {mt!r} is not supported (supported: {', '.join(supported_types())})")
    if family is not None:
        cfg = _llama_config(c, file)
        try:
            cfg = family.hf_config(cfg, c) if family.hf_config is not None else cfg
            rotary_embedding(cfg)  # the RoPE scaling's parameters, checked before any weight is read
        except (ValueError, KeyError, TypeError) as e:
            raise UnsupportedModelError(file, f"{mt}: {e}") from e
        return replace(cfg, extra={**cfg.extra, "family": family.name})
    if mt == "gpt2":
        for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
            if c.get(flag, ok) != ok:
                raise UnsupportedModelError(file, f"GPT-2 with {flag}={c[flag]} is not supported")
        d = c["n_embd"]
        return GPT2Config(vocab_size=c["vocab_size"], max_seq_len=c["n_positions"], d_model=d, n_layers=c["n_layer"],
                          n_heads=c["n_head"], d_ff=c.get("n_inner") or 4 * d, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                          activation=_activation(c.get("activation_function", "gelu_new"), file))
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(file, f"BERT position_embedding_type {c['position_embedding_type']!r} is not supported")
    return BertConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                      n_heads=c["num_attention_heads"], d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                      type_vocab_size=c.get("type_vocab_size", 2), norm_eps=c.get("layer_norm_eps", 1e-12),
                      activation=_activation(c.get("hidden_act", "gelu"), file))


def _activation(name: str, file: Path) -> str:
    table = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if name not in table:
        raise UnsupportedModelError(file, f"activation {name!r} is not supported (supported: {sorted(table)})")
    return table[name]


def _llama_config(c: dict[str, Any], file: Path) -> LlamaConfig:
    """What every decoder family's config.json says the same way (families then set their own options)."""
    mt = c["model_type"]
    act = c.get("hidden_act", c.get("hidden_activation", "silu"))
    if mt == "gemma" and act == "gelu":  # Gemma 1's legacy value; transformers' GemmaConfig reads it as the tanh GELU
        act = "gelu_pytorch_tanh"
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(file, f"hidden_act {act!r} is not supported for {mt} (expected silu or gelu_pytorch_tanh)")
    # transformers ≥ 5 writes rope_parameters (theta + scaling); older versions rope_theta + rope_scaling
    rope = dict(c.get("rope_parameters") or {})
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = dict(c.get("rope_scaling") or rope)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(file, f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind in ("llama3", "yarn", "longrope", "su"):  # transformers' standardize_rope_params
        orig = scaling.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = orig or c.get("max_position_embeddings", 4096)
    if kind in ("linear", "dynamic") and not isinstance(scaling.get("factor"), (int, float)):
        raise UnsupportedModelError(file, f"RoPE scaling {kind!r} without a numeric factor")
    nh = c["num_attention_heads"]
    attn_bias = bool(c.get("attention_bias", False))
    return LlamaConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=nh,
        n_kv_heads=c.get("num_key_value_heads") or nh, d_ff=c["intermediate_size"], head_dim=c.get("head_dim"),
        norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=None if kind == "default" else dict(scaling),
        max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=attn_bias, mlp_bias=bool(c.get("mlp_bias", False)),
        act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu", extra={"model_type": mt},
    )


# -- safetensors ---------------------------------------------------------------------------------
class SafetensorsSource:
    """The tensors of a directory's single or sharded safetensors checkpoint."""

    def __init__(self, directory: Path) -> None:
        index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
        if index.exists():
            weight_map: dict[str, str] = read_json(index).get("weight_map", {})
            if not weight_map:
                raise ModelLoadError(index, "index has no weight_map")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = [single.name], {}
        else:
            raise ModelLoadError(directory, "no model.safetensors or model.safetensors.index.json "
                                            "(pickled .bin checkpoints are not loaded)")
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, Path] = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise ModelLoadError(path, "shard listed in model.safetensors.index.json is missing")
            try:
                h = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(path, f"cannot read safetensors (truncated or corrupt?): {e}") from e
            self._handles[name] = h
            for k in h.keys():
                self.file_of[k] = path
        for k, shard in weight_map.items():
            if k not in self.file_of:
                raise ModelLoadError(directory / shard, "tensor listed in the index is not in its shard", tensor=k)
        self.directory = directory

    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        try:
            return self._handles[path.name].get_tensor(name).float()
        except SafetensorError as e:
            raise ModelLoadError(path, f"cannot read tensor data: {e}", tensor=name) from e


# -- name maps: (our-name regex, checkpoint-name template with {p} = prefix, transform) -------
Rule = tuple[str, str, Callable[[torch.Tensor, re.Match], torch.Tensor] | None]

_LLAMA: list[Rule] = [
    (r"tok_embeddings\.weight", "{p}embed_tokens.weight", None),
    (r"norm\.weight", "{p}norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (r"layers\.(\d+)\.norm1\.weight", r"{p}layers.\1.input_layernorm.weight", None),
    (r"layers\.(\d+)\.norm2\.weight", r"{p}layers.\1.post_attention_layernorm.weight", None),
    (r"layers\.(\d+)\.self_attn\.(.+)", r"{p}layers.\1.self_attn.\2", None),
    (r"layers\.(\d+)\.ffn\.(.+)", r"{p}layers.\1.mlp.\2", None),
]
_LLAMA_IGNORE = [r".*rotary_emb\.inv_freq", r"lm_head\.weight"]  # lm_head: present in some tied checkpoints


def _qkv_slice(j: int) -> Callable[[torch.Tensor, re.Match], torch.Tensor]:
    """Part j (0 = q, 1 = k, 2 = v) of GPT-2's fused c_attn: Conv1D weight (d, 3d) → Linear (d, d)."""
    def f(t: torch.Tensor, m: re.Match) -> torch.Tensor:
        d = t.shape[-1] // 3
        part = t[..., j * d : (j + 1) * d]
        return part.t() if t.dim() == 2 else part
    return f


def _t(t: torch.Tensor, m: re.Match) -> torch.Tensor:  # Conv1D stores (in, out)
    return t.t() if t.dim() == 2 else t


_GPT2: list[Rule] = [
    (r"tok_embeddings\.weight", "{p}wte.weight", None),
    (r"pos_embeddings\.weight", "{p}wpe.weight", None),
    (r"norm\.(weight|bias)", r"{p}ln_f.\1", None),
    (r"layers\.(\d+)\.norm1\.(.+)", r"{p}h.\1.ln_1.\2", None),
    (r"layers\.(\d+)\.norm2\.(.+)", r"{p}h.\1.ln_2.\2", None),
    *[(rf"layers\.(\d+)\.self_attn\.{n}_proj\.(.+)", r"{p}h.\1.attn.c_attn.\2", _qkv_slice(j)) for j, n in enumerate("qkv")],
    (r"layers\.(\d+)\.self_attn\.o_proj\.(.+)", r"{p}h.\1.attn.c_proj.\2", _t),
    (r"layers\.(\d+)\.ffn\.up\.(.+)", r"{p}h.\1.mlp.c_fc.\2", _t),
    (r"layers\.(\d+)\.ffn\.down\.(.+)", r"{p}h.\1.mlp.c_proj.\2", _t),
]
_GPT2_IGNORE = [r".*\.attn\.(masked_)?bias", r"lm_head\.weight"]

_BERT: list[Rule] = [
    (r"tok_embeddings\.weight", "{p}embeddings.word_embeddings.weight", None),
    (r"pos_embeddings\.weight", "{p}embeddings.position_embeddings.weight", None),
    (r"type_embeddings\.weight", "{p}embeddings.token_type_embeddings.weight", None),
    (r"emb_norm\.(.+)", r"{p}embeddings.LayerNorm.\1", None),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(.+)", r"{p}encoder.layer.\1.attention.self.query.\2", None),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(.+)", r"{p}encoder.layer.\1.attention.self.key.\2", None),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(.+)", r"{p}encoder.layer.\1.attention.self.value.\2", None),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(.+)", r"{p}encoder.layer.\1.attention.output.dense.\2", None),
    (r"layers\.(\d+)\.norm1\.(.+)", r"{p}encoder.layer.\1.attention.output.LayerNorm.\2", None),
    (r"layers\.(\d+)\.ffn\.up\.(.+)", r"{p}encoder.layer.\1.intermediate.dense.\2", None),
    (r"layers\.(\d+)\.ffn\.down\.(.+)", r"{p}encoder.layer.\1.output.dense.\2", None),
    (r"layers\.(\d+)\.norm2\.(.+)", r"{p}encoder.layer.\1.output.LayerNorm.\2", None),
]
_BERT_IGNORE = [r".*pooler\..*", r".*embeddings\.position_ids", r"cls\..*"]

FAMILIES: dict[type, tuple[type[nn.Module], list[Rule], list[str], tuple[str, ...]]] = {
    # config type: (model class, rules, ignorable, candidate prefixes); a decoder family adds its own (name_rules)
    LlamaConfig: (Llama, _LLAMA, _LLAMA_IGNORE, ("model.", "")),
    GPT2Config: (GPT2, _GPT2, _GPT2_IGNORE, ("transformer.", "")),
    BertConfig: (Bert, _BERT, _BERT_IGNORE, ("bert.", "")),
}


def name_rules(cfg: Any) -> tuple[type[nn.Module], list[Rule], list[str], tuple[str, ...]]:
    """(model class, name rules, ignorable names, candidate prefixes) of a config: its family's rules
    (e.g. Gemma's sandwich norms) before the common ones of its type."""
    model_cls, rules, ignore, prefixes = FAMILIES[type(cfg)]
    family = getattr(cfg, "extra", {}).get("family")
    if family is not None:
        fam = registry.by_name(family)
        rules, ignore = [*fam.hf_rules, *rules], [*fam.hf_ignore, *ignore]
    return model_cls, rules, ignore, prefixes


def make_plan(shapes: dict[str, torch.Size], rules: list[Rule], prefix: str,
              load: Callable[[str], torch.Tensor]) -> Plan:
    plan: Plan = {}
    for ours in shapes:
        for pattern, template, transform in rules:
            m = re.fullmatch(pattern, ours)
            if m:
                src = m.expand(template.replace("{p}", prefix))
                plan[ours] = (src, (lambda s=src, m=m, f=transform: load(s) if f is None else f(load(s), m)))
                break
        else:  # pragma: no cover - a rule table bug
            raise AssertionError(f"no name rule for parameter {ours}")
    return plan


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32, tp: TensorParallel | None = None) -> nn.Module:
    """The model of an HF directory (config.json + safetensors), fully loaded or a ModelLoadError. ``tp``: only
    this tensor-parallel rank's slice of each tensor (:mod:`attnkit.parallel.tensor`)."""
    directory = Path(directory)
    cfg = model_config(read_json(directory / "config.json"), directory / "config.json")
    source = SafetensorsSource(directory)
    model_cls, rules, ignore, prefixes = name_rules(cfg)
    if tp is not None and not hasattr(cfg, "n_kv_heads"):
        raise ValueError(f"tensor parallelism splits Llama-family models; {type(cfg).__name__} is not one")
    model, shapes = expected_shapes(model_cls, cfg if tp is None else tp.local_config(cfg))
    names = set(source.names())
    embed_rule = make_plan({"tok_embeddings.weight": torch.Size()}, rules, "", source.load)["tok_embeddings.weight"][0]
    prefix = next((p for p in prefixes if p + embed_rule in names), "")
    plan = make_plan(shapes, rules, prefix, source.load)
    check_present(directory, plan, names)
    check_leftovers(directory, plan, names, ignore)
    if tp is not None:
        plan = tp.shard_plan(plan, cfg)
    return materialize(model, shapes, plan, directory, dtype, file_of=lambda s: source.file_of.get(s, directory))


_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def sentence_transformers_config(directory: Path, max_len: int) -> tuple[str, bool, int]:
    """(pooling, normalize, max tokens) from sentence-transformers' modules.json, 1_Pooling/config.json
    and sentence_bert_config.json; without them its defaults for a plain model: mean pooling, no
    normalisation, the model's own length limit."""
    pooling, normalize = "mean", False
    if (directory / "modules.json").exists():
        for mod in read_json(directory / "modules.json"):
            kind = mod.get("type", "")
            if kind.endswith("Pooling"):
                file = directory / mod.get("path", "") / "config.json"
                on = [k for k, v in read_json(file).items() if k.startswith("pooling_mode") and v is True]
                if len(on) != 1 or on[0] not in _POOLING_MODES:
                    raise UnsupportedModelError(file, f"pooling {on} is not supported (one of {sorted(_POOLING_MODES)})")
                pooling = _POOLING_MODES[on[0]]
            elif kind.endswith("Normalize"):
                normalize = True
            elif not kind.endswith("Transformer"):
                raise UnsupportedModelError(directory / "modules.json",
                                            f"sentence-transformers module {kind!r} is not supported")
    if (directory / "sentence_bert_config.json").exists():
        max_len = min(max_len, read_json(directory / "sentence_bert_config.json").get("max_seq_length") or max_len)
    return pooling, normalize, max_len
