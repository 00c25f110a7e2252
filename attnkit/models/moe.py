"""The sparse mixtures of experts: Mixtral, Qwen3-MoE and OLMoE.

A sparsely-gated mixture-of-experts layer (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", §2) replaces the decoder's feed-forward sublayer by E gated FFNs
and a router that sends each token to k of them:

    p = softmax(x·W_r)                    (E router probabilities)
    S = TopK(p, k)
    y = Σ_{e∈S} w_e · SwiGLU_e(x),  w_e = p_e / Σ_{j∈S} p_j   (renormalised)   or   w_e = p_e   (not)

The rest of the block is the pre-norm Llama decoder (:mod:`attnkit.models.llama`), and the layer is
:class:`attnkit.nn.moe.SparseMoE`. The families differ in the router's normalisation and the attention:

- **Mixtral** (Jiang et al. 2024, "Mixtral of Experts", eq. 1–2: softmax over the top-k logits, i.e.
  renormalised; 8 experts, k = 2): Mistral's attention (GQA, optional sliding window). Checkpoints name the
  layer ``block_sparse_moe`` with ``gate`` (router) and ``experts.N.w1/w3/w2`` (gate/up/down). llama.cpp
  writes it as a ``llama`` file with stacked expert tensors, so the llama family's GGUF hook
  (:func:`llama_gguf`) turns a llama file with experts into this family.
- **Qwen3-MoE** (Qwen Team 2025, "Qwen3 Technical Report", §2: 128 experts, k = 8, no shared experts):
  Qwen3's attention (RMSNorm on each q/k head); renormalised when config.json's ``norm_topk_prob`` (true in
  the released models; transformers' default is false). llama.cpp's ``qwen3moe`` graph always renormalises.
- **OLMoE** (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", §2: 64 experts,
  k = 8): RMSNorm over the whole q and k projections (``qk_norm="full"``); the top-k probabilities are
  *not* renormalised (``norm_topk_prob`` false, llama.cpp's ``olmoe`` graph likewise).

GGUF files hold each layer's experts as 3-D tensors ``blk.N.ffn_{gate,up,down}_exps.weight`` (PyTorch order
(E, ff, d) and (E, d, ff)) and the router as ``blk.N.ffn_gate_inp.weight``; :mod:`attnkit.loading.gguf`
slices expert e out of them (with ``quantize="gguf"`` the file's blocks of rows e·R … (e+1)·R).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .llama import LlamaConfig
from .qwen3 import qwen3_gguf, qwen3_hf
from .registry import Family, register


def with_experts(cfg: LlamaConfig, n_experts: Any, top_k: Any, d_ff: Any, norm_topk_prob: bool) -> LlamaConfig:
    """``cfg`` with every FFN a mixture of ``n_experts`` SwiGLUs of hidden size ``d_ff``, ``top_k`` per token."""
    for what, v in (("the number of experts", n_experts), ("experts per token", top_k), ("the experts' hidden size", d_ff)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if top_k > n_experts:
        raise ValueError(f"{top_k} experts per token but only {n_experts} experts")
    return replace(cfg, n_experts=n_experts, n_experts_per_tok=top_k, moe_d_ff=d_ff, norm_topk_prob=norm_topk_prob)


# -- config.json ---------------------------------------------------------------------------------
def mixtral_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """MixtralForCausalLM: num_local_experts, num_experts_per_tok; each expert of intermediate_size; always
    renormalised."""
    cfg = replace(cfg, sliding_window=c.get("sliding_window"))
    return with_experts(cfg, c.get("num_local_experts"), c.get("num_experts_per_tok"), c.get("intermediate_size"), True)


def qwen3_moe_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """Qwen3MoeForCausalLM: every layer sparse (mlp_only_layers empty, decoder_sparse_step 1), experts of
    moe_intermediate_size, renormalised iff norm_topk_prob."""
    if c.get("mlp_only_layers"):
        raise ValueError(f"mlp_only_layers={c['mlp_only_layers']} (dense FFN layers among the sparse ones) is not supported")
    if c.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"decoder_sparse_step={c['decoder_sparse_step']} (dense FFN layers among the sparse ones) "
                         "is not supported (only 1: every layer sparse)")
    if c.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (shared_expert_intermediate_size, Qwen2-MoE) are not supported")
    n = c.get("num_experts", c.get("num_local_experts"))  # transformers 5 writes num_local_experts
    return with_experts(qwen3_hf(cfg, c), n, c.get("num_experts_per_tok"), c.get("moe_intermediate_size"),
                        bool(c.get("norm_topk_prob", False)))


def olmoe_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    """OlmoeForCausalLM: q/k RMSNorm over the whole projection, experts of intermediate_size, renormalised iff
    norm_topk_prob (false in OLMoE-1B-7B)."""
    if c.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={c['clip_qkv']} (q, k, v clamped) is not supported")
    bias = bool(c.get("attention_bias", False))  # OLMoE: on all four projections
    cfg = replace(cfg, qk_norm="full", qkv_bias=bias, o_bias=bias)
    n = c.get("num_experts", c.get("num_local_experts"))
    return with_experts(cfg, n, c.get("num_experts_per_tok"), c.get("intermediate_size"), bool(c.get("norm_topk_prob", False)))


# -- GGUF metadata -----------------------------------------------------------------------------
def gguf_experts(cfg: LlamaConfig, get, tensors: dict[str, Any], norm_topk_prob: bool) -> LlamaConfig:
    """The experts of a GGUF file: ``<arch>.expert_count`` / ``expert_used_count`` and the 3-D expert tensors
    (their shape gives each expert's hidden size)."""
    if "blk.0.ffn_gate_exps.weight" not in tensors:
        if "blk.0.ffn_gate.0.weight" in tensors:
            raise ValueError("experts stored one tensor each (blk.N.ffn_gate.E.weight, llama.cpp's layout before "
                             "April 2024) are not supported: convert the checkpoint again with a current convert_hf_to_gguf.py")
        raise ValueError("expert_count is set but the file has no expert tensors (blk.0.ffn_gate_exps.weight)")
    if "blk.0.ffn_gate_inp.weight" not in tensors:
        raise ValueError("the file has expert tensors but no router (blk.0.ffn_gate_inp.weight)")
    if any(name.startswith("blk.0.ffn_") and "shexp" in name for name in tensors):
        raise ValueError("shared experts (blk.N.ffn_*_shexp) are not supported")
    if get("attention.clamp_kqv") is not None:
        raise ValueError("attention.clamp_kqv (q, k, v clamped) is not supported")
    shape = tuple(tensors["blk.0.ffn_gate_exps.weight"].shape)
    n, k = get("expert_count"), get("expert_used_count")
    if len(shape) != 3 or shape[0] != n or shape[2] != cfg.d_model:
        raise ValueError(f"blk.0.ffn_gate_exps.weight has shape {shape}, expected (expert_count={n}, ff, {cfg.d_model})")
    ff = get("expert_feed_forward_length", shape[1])
    if ff != shape[1]:
        raise ValueError(f"expert_feed_forward_length={ff} but the expert tensors have {shape[1]} rows")
    return with_experts(cfg, n, k, ff, norm_topk_prob)


def llama_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    """The llama family's GGUF hook: a ``llama`` file with experts (``expert_count`` or expert tensors) is a
    Mixtral (llama.cpp's llama graph renormalises the top-k weights); any other stays plain Llama."""
    if not get("expert_count", 0) and "blk.0.ffn_gate_inp.weight" not in tensors:
        return cfg
    cfg = gguf_experts(cfg, get, tensors, norm_topk_prob=True)
    return replace(cfg, extra={**cfg.extra, "family": "mixtral"})


def qwen3moe_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    return gguf_experts(qwen3_gguf(cfg, get, tensors), get, tensors, norm_topk_prob=True)  # llama.cpp: always


def olmoe_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    if "blk.0.attn_q_norm.weight" not in tensors:
        raise ValueError("an olmoe file without blk.0.attn_q_norm.weight")
    return gguf_experts(replace(cfg, qk_norm="full"), get, tensors, norm_topk_prob=False)


# -- tensor names ------------------------------------------------------------------------------
_ROUTER = r"layers\.(\d+)\.ffn\.router\.weight"
_MIXTRAL_HF = (
    (_ROUTER, r"{p}layers.\1.block_sparse_moe.gate.weight", None),
    *((rf"layers\.(\d+)\.ffn\.experts\.(\d+)\.{ours}_proj\.weight",
       rf"{{p}}layers.\1.block_sparse_moe.experts.\2.{w}.weight", None)
      for ours, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
)
# Qwen3-MoE / OLMoE: mlp.gate is the router; mlp.experts.N.{gate,up,down}_proj follow the common rule (ffn → mlp)
_MLP_GATE_HF = ((_ROUTER, r"{p}layers.\1.mlp.gate.weight", None),)
_GGUF = (
    (_ROUTER, r"blk.\1.ffn_gate_inp.weight"),
    # every expert e of a layer reads its slice of the stacked tensor (attnkit.loading.gguf.expert_of)
    (r"layers\.(\d+)\.ffn\.experts\.\d+\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_exps.weight"),
)
_SUPPORTS = {"HF": "yes", "GGUF": "yes", "engine": "yes", "C step": "yes", "LoRA": "yes (not the router)"}

register(Family("mixtral", hf_types=("mixtral",), hf_config=mixtral_hf, hf_rules=_MIXTRAL_HF, gguf_rules=_GGUF,
                permute_qk=True, supports={**_SUPPORTS, "GGUF": "yes (as llama)"}, example="Mixtral-8x7B"))
register(Family("qwen3_moe", hf_types=("qwen3_moe",), gguf_archs=("qwen3moe",), hf_config=qwen3_moe_hf,
                gguf_config=qwen3moe_gguf, hf_rules=_MLP_GATE_HF, gguf_rules=_GGUF, supports=_SUPPORTS,
                example="Qwen3-30B-A3B"))
register(Family("olmoe", hf_types=("olmoe",), gguf_archs=("olmoe",), hf_config=olmoe_hf, gguf_config=olmoe_gguf,
                hf_rules=_MLP_GATE_HF, gguf_rules=_GGUF, supports=_SUPPORTS, example="OLMoE-1B-7B"))
