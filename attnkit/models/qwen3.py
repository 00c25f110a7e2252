"""Qwen3 (Qwen Team 2025, "Qwen3 Technical Report", §2): the Qwen2 decoder without the q/k/v biases and
with RMSNorm on each query and key head before RoPE (QK-norm, Dehghani et al. 2023), whose head_dim is a
free parameter (128 even where d_model / n_heads is 64):

    q_h ← RMSNorm_q(x·W_Q,h),  k_h ← RMSNorm_k(x·W_K,h),  then RoPE and attention as in Llama.

The block is :class:`~attnkit.nn.TransformerLayer` with ``qk_norm="head"``; this module says how config.json
and GGUF (llama.cpp's ``qwen3`` architecture: ``blk.N.attn_q_norm`` / ``attn_k_norm``) describe it.
Qwen3-MoE is registered with the other mixtures of experts (:mod:`attnkit.models.moe`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .llama import LlamaConfig
from .registry import Family, register


def qwen3_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """config.json of Qwen3ForCausalLM: head_dim given, q/k norm, no biases unless attention_bias."""
    if c.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported")
    return replace(cfg, qk_norm="head", o_bias=bool(c.get("attention_bias", False)))


def qwen3_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    if "blk.0.attn_q_norm.weight" not in tensors:
        raise ValueError("a qwen3 file without blk.0.attn_q_norm.weight")
    return replace(cfg, qk_norm="head")


register(Family("qwen3", hf_types=("qwen3",), gguf_archs=("qwen3",), hf_config=qwen3_hf, gguf_config=qwen3_gguf,
                supports={"HF": "yes", "GGUF": "yes", "engine": "yes", "C step": "yes", "LoRA": "yes"},
                example="Qwen3-0.6B … 32B"))
