"""Phi-3 / Phi-3.5 / Phi-4-mini (Abdin et al. 2024, "Phi-3 Technical Report"; Microsoft 2025, "Phi-4-Mini
Technical Report"): the Llama decoder with the q, k, v projections fused into one ``qkv_proj`` and the gate and
up projections into one ``gate_up_proj``, and LongRoPE for long context:

    [q; k; v] = x·W_qkvᵀ   (rows: n_heads·hd, n_kv_heads·hd, n_kv_heads·hd)
    [g; u]    = x·W_guᵀ    (rows: d_ff, d_ff);  FFN(x) = W_down·(SiLU(g) ⊙ u)

The 128k models scale RoPE with LongRoPE (Ding et al. 2024, "LongRoPE"; config.json ``rope_scaling`` type
"longrope", formerly "su"): per-frequency rescale factors, ``short_factor`` for sequences up to
``original_max_position_embeddings`` tokens and ``long_factor`` beyond, and cos/sin multiplied by
√(1 + ln s / ln L) (see :func:`attnkit.models.llama.rope_inv_freq`, :class:`attnkit.nn.RotaryEmbedding`).
Phi-4-mini rotates only ``partial_rotary_factor`` = 3/4 of each head (half-split within the rotated part, as
transformers' Phi3 ``apply_rotary_pos_emb``) and ties its embeddings. Phi-3-mini-4k has a sliding window of
2047 keys (transformers applies it; llama.cpp currently does not).

The block is the shared :class:`~attnkit.nn.TransformerLayer` with separate q/k/v and gate/up projections: this
module cuts the fused tensors of a checkpoint into them — by rows in HF safetensors (``qkv_proj``,
``gate_up_proj``) and in GGUF (llama.cpp's ``phi3`` architecture: ``blk.N.attn_qkv``, ``blk.N.ffn_up`` holding
gate and up; its LongRoPE factors are the tensors ``rope_factors_long`` / ``rope_factors_short``, which the
common GGUF reader folds into the config). llama.cpp does not permute phi3's Q/K rows (NEOX-style RoPE).

LoRA: attnkit's adapters sit on q_proj / k_proj / v_proj / gate_proj / up_proj (and the engine serves them);
HF PEFT's Phi-3 adapters sit on the fused ``qkv_proj`` / ``gate_up_proj``, which have no attnkit counterpart
here, so adapters are saved and loaded in attnkit's module names (o_proj and down_proj map one to one).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from .llama import LlamaConfig
from .registry import Family, register


def _qkv_part(j: int):
    """Part j (0 q, 1 k, 2 v) of HF's fused qkv_proj weight (rows q, k, v). transformers' Phi3Attention takes
    the first n_heads·hd rows as q with hd = hidden / n_heads (:func:`phi3_hf` refuses another head_dim), so q is
    the first ``in_features`` rows and k, v split the rest in halves."""
    def f(t: torch.Tensor, m: re.Match) -> torch.Tensor:
        d = t.shape[-1]  # hidden = n_heads · hd rows of q
        kv = (t.shape[0] - d) // 2
        return (t[:d], t[d:d + kv], t[d + kv:])[j]
    f.fused_part = ("qkv", j)  # type: ignore[attr-defined]  # what attnkit.peft.families reads
    return f


def _gate_up_part(j: int):
    """Part j (0 gate, 1 up) of HF's fused gate_up_proj (transformers' Phi3MLP: ``gate, up = x.chunk(2)``)."""
    def f(t: torch.Tensor, m: re.Match) -> torch.Tensor:
        return t.chunk(2, dim=0)[j]
    f.fused_part = ("gate_up", j)  # type: ignore[attr-defined]
    return f


HF_RULES = (
    *((rf"layers\.(\d+)\.self_attn\.{n}_proj\.weight", r"{p}layers.\1.self_attn.qkv_proj.weight", _qkv_part(j))
      for j, n in enumerate("qkv")),
    *((rf"layers\.(\d+)\.ffn\.{n}_proj\.weight", r"{p}layers.\1.mlp.gate_up_proj.weight", _gate_up_part(j))
      for j, n in enumerate(("gate", "up"))),
)

GGUF_RULES = (  # rows of llama.cpp's fused tensors (attnkit.loading.gguf._PART); separate attn_q/k/v fall through
    (r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(\w+)", r"blk.\1.attn_qkv.\3[\2]"),
    (r"layers\.(\d+)\.ffn\.(gate|up)_proj\.weight", r"blk.\1.ffn_up.weight[\2]"),
)


def _longrope(sc: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """transformers' Phi3Config: "su" and "yarn" are LongRoPE, and the top-level original_max_position_embeddings
    (default 4096) takes precedence over the one in rope_scaling."""
    orig = int(c.get("original_max_position_embeddings", 4096))
    return {**sc, "rope_type": "longrope", "original_max_position_embeddings": orig}


def phi3_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """config.json of Phi3ForCausalLM (Phi-3, Phi-3.5-mini, Phi-4-mini)."""
    d, nh = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, d // nh) or d % nh:
        raise ValueError(f"head_dim {c.get('head_dim')} ≠ hidden_size / num_attention_heads is not supported")
    rope = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) or 1.0
    sc = cfg.rope_scaling
    if sc is not None:
        kind = sc.get("rope_type", sc.get("type"))
        if kind not in ("longrope", "su", "yarn"):
            raise ValueError(f"RoPE scaling {kind!r} (transformers' Phi3 takes longrope, su or yarn = longrope)")
        sc = _longrope(sc, c)
    return replace(cfg, partial_rotary=float(partial), rope_scaling=sc, sliding_window=c.get("sliding_window"),
                   o_bias=False, qkv_bias=False)


def phi3_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    """llama.cpp's phi3 architecture: rope.dimension_count (partial rotary) and LongRoPE are read by the common
    reader; ``attention.sliding_window`` (0: none, Phi-4) as transformers applies it."""
    if "blk.0.ffn_gate.weight" in tensors:
        raise ValueError("a phi3 file with a separate ffn_gate (llama.cpp's phi3 holds gate and up in ffn_up)")
    window = get("attention.sliding_window", 0)
    return replace(cfg, sliding_window=int(window) if window else None)


def needs_reprefill(model: Any, cached: int, total: int) -> bool:
    """Whether a generation loop holding ``cached`` tokens in its KV cache must rebuild it to go on with a sequence
    of ``total`` tokens, as transformers' ``Phi3ForCausalLM.prepare_inputs_for_generation`` does: once a LongRoPE
    sequence grows past the original context L while its cache holds at most L tokens (rotated with the short
    factors), transformers drops the cache and runs the whole sequence again with the long factors.

    attnkit's model only rotates the tokens it is given (its cache keeps the short-rotated keys, as transformers'
    own forward with a cache does); a loop that wants transformers' generate token for token calls this before each
    step. The inference engine does not re-prefill: it rotates each position at its own length.
    """
    rot = getattr(model, "rotary", None)
    L = getattr(rot, "long_after", None)
    return L is not None and 0 < cached <= L < total


register(Family("phi3", hf_types=("phi3",), gguf_archs=("phi3",), hf_config=phi3_hf, gguf_config=phi3_gguf,
                hf_rules=HF_RULES, gguf_rules=GGUF_RULES,
                supports={"HF": "yes", "GGUF": "yes", "engine": "yes",
                          "C step": "yes",
                          "LoRA": "yes"},
                example="Phi-3-mini, Phi-3.5-mini, Phi-4-mini"))
