"""The Gemma families (Google DeepMind): Gemma, Gemma 2 and Gemma 3 (text), on the one pre-norm decoder.

Gemma (Team Gemma 2024a, "Gemma: Open Models Based on Gemini Research and Technology", §2) is Llama with
three changes: GeGLU instead of SwiGLU (the tanh-approximated GELU gates the up projection), RMSNorm
weights stored as offsets from 1 (y = x/rms(x)·(1 + γ)), and embeddings multiplied by √d_model (the
tied output embedding is not):

    h_0 = √d · E[x]
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}));  h_l ← h_l + GeGLU(RMSNorm(h_l))

Gemma 2 (Team Gemma 2024b, "Gemma 2: Improving Open Language Models at a Practical Size", §2, Table 1)
adds, per layer,

- sandwich norms: each sublayer's output is normalised again before the residual add,
      h ← h + RMSNorm'(Attn(RMSNorm(h))),   h ← h + RMSNorm'(GeGLU(RMSNorm(h)));
- logit soft-capping: attention scores s ← c_a·tanh(s/c_a) (c_a = 50, after the 1/√q scaling, before
  the causal mask) and output logits z ← c_f·tanh(z/c_f) (c_f = 30);
- local/global alternation: even layers (0, 2, …) see a sliding window of 4096 keys, odd layers all;
- the softmax scale query_pre_attn_scalar^−½ (d_model / n_heads for 27B instead of head_dim).

Gemma 3 (Team Gemma 2025, "Gemma 3 Technical Report", §2.1–2.2) keeps the sandwich norms and replaces
attention soft-capping by QK-norm (a (1 + γ) RMSNorm on every query and key head before RoPE,
Dehghani et al. 2023); its layers alternate five local (window 512 or 1024) to one global, the local
layers with RoPE base 10k, the global ones with base 1M (and, from 4B up, linear position interpolation
by 8 for long context). Final soft-capping is off in the released models but honoured when set.

All of that is :class:`~attnkit.models.llama.Llama` with its options (``norm_offset``, ``post_norms``,
``embed_scale``, ``act="gelu_tanh"``, ``attn_scale``, ``attn_softcap``, ``final_softcap``,
``layer_windows``, ``rope_local_theta``, ``qk_norm="head"``); this module says how config.json
(``model_type`` gemma, gemma2, gemma3_text) and GGUF files (llama.cpp's gemma, gemma2, gemma3 architectures)
describe them, and what the tensors are called:

=================  ==============================  ===========================
attnkit            HF (Gemma 2/3)                  GGUF
=================  ==============================  ===========================
norm1              input_layernorm                 attn_norm
post_attn_norm     post_attention_layernorm        post_attention_norm
norm2              pre_feedforward_layernorm       ffn_norm
post_ffn_norm      post_feedforward_layernorm      post_ffw_norm
=================  ==============================  ===========================

(Gemma 1 names its pre-FFN norm post_attention_layernorm, as Llama.) llama.cpp's converter adds 1 to every
``*norm.weight`` (convert_hf_to_gguf.py, GemmaModel/Gemma2Model/Gemma3Model.modify_tensors), so a GGUF
Gemma's norms are plain (``norm_offset`` 0). GGUF has no query_pre_attn_scalar: llama.cpp (src/models/
gemma2.cpp, gemma3.cpp) scales by head_dim^−½, or by (d_model / n_heads)^−½ for the 27B models, which it
recognises by their layer count (46 / 62) — done the same here.

Gemma 3 multimodal checkpoints (``model_type`` gemma3, the text model inside ``text_config``) are not
loaded; GGUF conversions of them hold the text model alone (arch gemma3) and are.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .llama import LlamaConfig
from .registry import Family, MetaGet, register

#: the layer counts llama.cpp recognises as the 27B models (softmax scale (d / n_heads)^−½)
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


# -- config.json ---------------------------------------------------------------------------------
def _gemma_common_hf(cfg: LlamaConfig, c: dict[str, Any], act_key: str = "hidden_activation") -> LlamaConfig:
    """What every Gemma's config.json implies: GeGLU, (1 + γ) norms, √d embedding scale, tied head.

    The activation is ``hidden_activation`` for Gemma 2/3 and ``hidden_act`` for Gemma 1, whose legacy
    value "gelu" transformers' GemmaConfig reads as the tanh approximation (as does attnkit).
    """
    act = c.get(act_key) or "gelu_pytorch_tanh"  # transformers' default
    if act_key == "hidden_act" and act == "gelu":
        act = "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{act_key} {act!r} is not supported (Gemma uses gelu_pytorch_tanh)")
    if c.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (EmbeddingGemma) is not supported: attnkit's Gemma is "
                         "causal")
    bias = bool(c.get("attention_bias", False))
    return replace(cfg, act="gelu_tanh", norm_offset=1.0, embed_scale=math.sqrt(cfg.d_model), qkv_bias=bias,
                   o_bias=bias, tie_embeddings=bool(c.get("tie_word_embeddings", True)))


def _layer_windows(c: dict[str, Any], n_layers: int, pattern: int) -> list[int | None] | None:
    """Per-layer sliding windows from ``layer_types`` (or, in older configs, every ``pattern``-th layer global)."""
    types = c.get("layer_types")
    if types is None:
        pattern = int(c.get("sliding_window_pattern") or pattern)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {types} is not {n_layers} of sliding_attention / full_attention")
    if "sliding_attention" not in types:
        return None
    window = c.get("sliding_window")
    if not window or window <= 0:
        raise ValueError(f"sliding_attention layers with sliding_window={window!r}")
    return [int(window) if t == "sliding_attention" else None for t in types]


def _scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rope_parameters / rope_scaling dict → LlamaConfig.rope_scaling (None: plain RoPE; the loader checks
    that attnkit computes the type)."""
    kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
    if kind == "default":
        return None
    return {k: v for k, v in dict(params).items() if k != "rope_theta"}  # type: ignore[arg-type]


def gemma_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """GemmaForCausalLM (Gemma 1): Llama + GeGLU, (1 + γ) norms, √d embeddings; softmax scale head_dim^−½."""
    return _gemma_common_hf(cfg, c, "hidden_act")


def gemma2_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """Gemma2ForCausalLM: + sandwich norms, attention/final soft-capping, sliding window on every other layer."""
    cfg = _gemma_common_hf(cfg, c)
    return replace(cfg, post_norms=True, attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                   attn_softcap=c.get("attn_logit_softcapping"), final_softcap=c.get("final_logit_softcapping"),
                   layer_windows=_layer_windows(c, cfg.n_layers, 2))


def gemma3_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """Gemma3ForCausalLM (model_type gemma3_text): + QK-norm, 5:1 local:global layers with their own RoPE.

    RoPE: transformers ≥ 5 writes ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``;
    older configs ``rope_theta`` (global, default 1M), ``rope_scaling`` (global) and ``rope_local_base_freq``
    (local, default 10k). transformers' Gemma3Attention never applies ``attn_logit_softcapping`` (nor does
    llama.cpp), so neither does attnkit.
    """
    cfg = _gemma_common_hf(cfg, c)
    rope = c.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:
        full = {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta") or rope.get("rope_theta")}
        local = {"rope_theta": c.get("rope_local_base_freq")}
    if _scaling(local) is not None:
        raise ValueError(f"RoPE scaling {local.get('rope_type')!r} on the sliding-window layers is not supported")
    return replace(cfg, qk_norm="head", post_norms=True,
                   attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                   attn_softcap=None, final_softcap=c.get("final_logit_softcapping"),
                   rope_theta=float(full.get("rope_theta") or 1_000_000.0), rope_scaling=_scaling(full),
                   rope_local_theta=float(local.get("rope_theta") or 10_000.0),
                   layer_windows=_layer_windows(c, cfg.n_layers, 6))


# -- GGUF ----------------------------------------------------------------------------------------
def _gemma_common_gguf(cfg: LlamaConfig) -> LlamaConfig:
    """Norm weights already hold 1 + γ (the converter added 1); GeGLU; √d embedding scale."""
    return replace(cfg, act="gelu_tanh", norm_offset=0.0, embed_scale=math.sqrt(cfg.d_model))


def _gguf_attn_scale(cfg: LlamaConfig, arch: str) -> float:
    """llama.cpp's softmax scale: (d_model / n_heads)^−½ for the 27B models, else head_dim^−½."""
    big = cfg.n_layers == _GGUF_27B_LAYERS[arch]
    return (cfg.d_model / cfg.n_heads if big else cfg.hd) ** -0.5


def _gguf_windows(get: MetaGet, cfg: LlamaConfig, window: int, default_pattern: int) -> list[int | None]:
    """llama.cpp's set_swa_pattern: layer i is local iff i mod p < p − 1 (p = 0: every layer local)."""
    p = int(get("attention.sliding_window_pattern", default_pattern))
    return [window if p == 0 or i % p < p - 1 else None for i in range(cfg.n_layers)]


def gemma_gguf(cfg: LlamaConfig, get: MetaGet, tensors: dict[str, Any]) -> LlamaConfig:
    """llama.cpp's gemma (src/models/gemma.cpp): no sandwich norms, no soft-capping, scale head_dim^−½."""
    return _gemma_common_gguf(cfg)


def gemma2_gguf(cfg: LlamaConfig, get: MetaGet, tensors: dict[str, Any]) -> LlamaConfig:
    """llama.cpp's gemma2: soft-capping 50 / 30 and window 4096 unless the file says otherwise, every other
    layer local; the local layers' RoPE base is ``rope.freq_base_swa`` when given, else the global one."""
    cfg = _gemma_common_gguf(cfg)
    if "blk.0.post_ffw_norm.weight" not in tensors:
        raise ValueError("a gemma2 file without blk.0.post_ffw_norm.weight")
    local = get("rope.freq_base_swa")
    if local is not None and float(local) != cfg.rope_theta and cfg.rope_scaling is not None:
        raise ValueError("rope.freq_base_swa together with RoPE scaling is not supported")
    return replace(cfg, post_norms=True, attn_scale=_gguf_attn_scale(cfg, "gemma2"),
                   attn_softcap=float(get("attn_logit_softcapping", 50.0)),
                   final_softcap=float(get("final_logit_softcapping", 30.0)),
                   rope_local_theta=None if local is None or float(local) == cfg.rope_theta else float(local),
                   layer_windows=_gguf_windows(get, cfg, int(get("attention.sliding_window", 4096)), 2))


def gemma3_gguf(cfg: LlamaConfig, get: MetaGet, tensors: dict[str, Any]) -> LlamaConfig:
    """llama.cpp's gemma3: QK-norm; with ``attention.sliding_window`` > 0, five local layers to one global,
    the local ones with RoPE base ``rope.freq_base_swa`` (default 10k) and no scaling; final soft-capping
    only when ``final_logit_softcapping`` is set (and not 0)."""
    cfg = _gemma_common_gguf(cfg)
    if "blk.0.attn_q_norm.weight" not in tensors:
        raise ValueError("a gemma3 file without blk.0.attn_q_norm.weight")
    cap = get("final_logit_softcapping")
    window = int(get("attention.sliding_window", 0) or 0)
    windows = _gguf_windows(get, cfg, window, 6) if window > 0 else None
    return replace(cfg, qk_norm="head", post_norms=True, attn_scale=_gguf_attn_scale(cfg, "gemma3"),
                   final_softcap=float(cap) if cap else None, layer_windows=windows,
                   rope_local_theta=float(get("rope.freq_base_swa", 10_000.0)) if windows else None)


# -- names ---------------------------------------------------------------------------------------
_HF_SANDWICH = (  # tried before the common Llama rules (which read post_attention_layernorm as norm2)
    (r"layers\.(\d+)\.post_attn_norm\.weight", r"{p}layers.\1.post_attention_layernorm.weight", None),
    (r"layers\.(\d+)\.norm2\.weight", r"{p}layers.\1.pre_feedforward_layernorm.weight", None),
    (r"layers\.(\d+)\.post_ffn_norm\.weight", r"{p}layers.\1.post_feedforward_layernorm.weight", None),
)
_GGUF_SANDWICH = (
    (r"layers\.(\d+)\.post_attn_norm\.weight", r"blk.\1.post_attention_norm.weight"),
    (r"layers\.(\d+)\.post_ffn_norm\.weight", r"blk.\1.post_ffw_norm.weight"),
)
_SUPPORTS = {"HF": "yes", "GGUF": "yes", "engine": "yes", "C step": "yes", "LoRA": "yes"}

register(Family("gemma", hf_types=("gemma",), gguf_archs=("gemma",), hf_config=gemma_hf, gguf_config=gemma_gguf,
                supports=_SUPPORTS, example="gemma-2b, gemma-1.1-7b-it"))
register(Family("gemma2", hf_types=("gemma2",), gguf_archs=("gemma2",), hf_config=gemma2_hf, gguf_config=gemma2_gguf,
                hf_rules=_HF_SANDWICH, gguf_rules=_GGUF_SANDWICH, supports=_SUPPORTS,
                example="gemma-2-2b-it, gemma-2-9b"))
register(Family("gemma3", hf_types=("gemma3_text",), gguf_archs=("gemma3",), hf_config=gemma3_hf,
                gguf_config=gemma3_gguf, hf_rules=_HF_SANDWICH, gguf_rules=_GGUF_SANDWICH, supports=_SUPPORTS,
                example="gemma-3-270m, gemma-3-1b-it (text)"))
