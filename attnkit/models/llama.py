"""The Llama family of decoder-only language models, composed of attnkit's blocks.

Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", §2.2) is the
GPT decoder with three changes: pre-normalisation with RMSNorm (Zhang & Sennrich 2019), the
SwiGLU feed-forward (Shazeer 2020) and rotary position embeddings (Su et al. 2021). Its
descendants differ only in configuration, so one file covers them all:

- Llama 2 / Mistral / SmolLM / SmolLM2: grouped-query attention (Ainslie et al. 2023), tied or untied
  output embedding; Mistral adds sliding-window attention (Jiang et al. 2023, §2).
- Llama 3: RoPE frequencies rescaled for long context (``rope_scaling={"rope_type": "llama3", ...}``).
- Qwen2 / Qwen2.5: bias on the q, k, v projections (not on o).

    h_0 = E[x]
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}));  h_l ← h_l + SwiGLU(RMSNorm(h_l))
    logits = RMSNorm(h_L) · W_outᵀ           (W_out = E when the embeddings are tied)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import KVCache, RMSNorm, RotaryEmbedding, TransformerLayer, causal_mask
from .registry import Family, register


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    d_ff: int = 11008
    head_dim: int | None = None  # default d_model // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    rope_freq_factors: list[float] | None = None  # llama.cpp's per-frequency divisors (GGUF rope_freqs)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: keys at most this many positions back
    # -- the options of today's families (defaults: Llama) -----------------------------------------
    layer_windows: list[int | None] | None = None  # per-layer sliding windows (Gemma 2/3); overrides sliding_window
    rope_local_theta: float | None = None  # Gemma 3: the base of the windowed layers' RoPE (no scaling)
    partial_rotary: float = 1.0  # fraction of head_dim rotated (Phi-4-mini: 0.75)
    qk_norm: str | None = None  # "head": RMSNorm of each q/k head before RoPE (Qwen3, Gemma 3); "full": OLMoE
    norm_offset: float = 0.0  # 1: RMSNorm weights are (1 + γ) (Gemma)
    post_norms: bool = False  # sandwich norms around each sublayer (Gemma 2/3)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: √d_model)
    act: str = "silu"  # the gated FFN's activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    attn_scale: float | None = None  # softmax scale; None: 1/√head_dim (Gemma: query_pre_attn_scalar^−½)
    attn_softcap: float | None = None  # attention logit soft-capping (Gemma 2)
    final_softcap: float | None = None  # output logit soft-capping (Gemma 2)
    n_experts: int = 0  # > 0: every FFN is a sparse mixture of experts (Mixtral, Qwen3-MoE, OLMoE)
    n_experts_per_tok: int = 0
    moe_d_ff: int | None = None  # each expert's hidden size (default d_ff)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights (Mixtral, Qwen3-MoE; not OLMoE)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (e.g. the checkpoint's model_type)

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it sees every earlier key)."""
        return self.layer_windows[layer] if self.layer_windows is not None else self.sliding_window

    @property
    def rotary_dim(self) -> int:
        return int(self.hd * self.partial_rotary) // 2 * 2


def rope_inv_freq(cfg: LlamaConfig, long: bool = False) -> torch.Tensor:
    """θ_i = base^(−2i/d), then the checkpoint's frequency scaling. Computed on the CPU in float64.

    As transformers' ``modeling_rope_utils`` (d = the rotated dimensions, s = ``factor``, L = the original
    context ``original_max_position_embeddings``):

    "linear" (position interpolation, Chen et al. 2023): θ_i / s.
    "llama3": long wavelengths (> original_context / low_freq_factor) are divided by ``factor``, short
    ones (< original_context / high_freq_factor) kept, the band between interpolated smoothly —
    as in Meta's reference code for Llama 3.1.
    "yarn" (Peng et al. 2023, "YaRN", §3.2 "NTK-by-parts", eq. 17–18): with r_i = L·θ_i/2π rotations
    in the original context, dimensions turning more than ``beta_fast`` times keep θ_i, those turning
    less than ``beta_slow`` times are interpolated to θ_i / s, a linear ramp over the dimension index in
    between (the ramp's ends floored / ceiled unless ``truncate`` is false). The attention factor is
    :func:`rope_attention_factor`.
    "longrope" / "su" (Ding et al. 2024, "LongRoPE", §3; Phi-3): θ_i / λ_i with per-frequency rescale
    factors λ = ``short_factor``, or ``long_factor`` (``long=True``) for sequences longer than L.
    "dynamic" (dynamic NTK-aware scaling, bloc97/emozilla): θ_i unchanged here — the base depends on the
    sequence's length, which :class:`~attnkit.nn.RotaryEmbedding` applies at run time (``dynamic_ntk``).
    """
    d = cfg.rotary_dim
    base = cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))  # (d/2,)
    sc = cfg.rope_scaling or {}
    kind = rope_type(cfg)
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor, old_ctx = _yarn_factor(cfg), _original_ctx(cfg)
        beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dimension index turning `rotations` times in L positions
            return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if sc.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = ((torch.arange(d // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)  # (d/2,)
        extrapolate = 1 - ramp  # 1: keep θ_i (high frequencies), 0: θ_i / s
        inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
    elif kind == "longrope":
        key = "long_factor" if long else "short_factor"
        ext = torch.tensor(sc[key], dtype=torch.float64, device="cpu")
        if ext.shape != inv.shape:
            raise ValueError(f"longrope {key} has {ext.numel()} values, the {d} rotated dimensions need {d // 2}")
        inv = inv / ext
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64, device="cpu")
    return inv


#: the RoPE scaling types :func:`rope_inv_freq` computes ("su": Phi-3's old name of longrope)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "su")


def rope_type(cfg: LlamaConfig) -> str:
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    return "longrope" if kind == "su" else kind


def _original_ctx(cfg: LlamaConfig) -> int:
    return int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_seq_len)


def _yarn_factor(cfg: LlamaConfig) -> float:
    f = (cfg.rope_scaling or {}).get("factor")
    return float(f) if f is not None else cfg.max_seq_len / _original_ctx(cfg)  # transformers: max / original


def rope_attention_factor(cfg: LlamaConfig) -> float:
    """The factor on cos and sin (so on every attention logit, squared) of the scaled RoPE variants.

    YaRN (Peng et al. 2023, eq. 22, √(1/t) = 0.1·ln s + 1): ``attention_factor`` if given, else
    mscale(s, ``mscale``) / mscale(s, ``mscale_all_dim``) when both are given (DeepSeek), else mscale(s)
    with mscale(s, m) = 0.1·m·ln s + 1 (1 for s ≤ 1). LongRoPE (Ding et al. 2024; transformers'
    ``_compute_longrope_parameters``): ``attention_factor`` if given, else √(1 + ln s / ln L) with
    s = ``factor`` or max_position_embeddings / L (1 for s ≤ 1). Every other type: 1.
    """
    sc, kind = cfg.rope_scaling or {}, rope_type(cfg)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    factor = _yarn_factor(cfg)
    if factor <= 1:
        return 1.0
    if kind == "longrope":
        return math.sqrt(1 + math.log(factor) / math.log(_original_ctx(cfg)))

    def mscale(s: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(s) + 1.0

    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return mscale(factor, sc["mscale"]) / mscale(factor, sc["mscale_all_dim"])
    return mscale(factor)


def rotary_embedding(cfg: LlamaConfig) -> RotaryEmbedding:
    """The model's RoPE: :func:`rope_inv_freq`, the attention factor, and LongRoPE's long frequencies or
    dynamic NTK's length-dependent base where the checkpoint scales its RoPE so."""
    kind, sc = rope_type(cfg), cfg.rope_scaling or {}
    extra: dict[str, Any] = {}
    if kind == "longrope":
        extra = {"long_inv_freq": rope_inv_freq(cfg, long=True), "long_after": _original_ctx(cfg)}
    elif kind == "dynamic":
        # transformers: the sequence length is compared with max_position_embeddings (not an "original" one)
        extra = {"dynamic_ntk": (float(sc["factor"]), cfg.max_seq_len)}
    return RotaryEmbedding(cfg.hd, base=cfg.rope_theta, rotary_dim=cfg.rotary_dim, inv_freq=rope_inv_freq(cfg),
                           attention_factor=rope_attention_factor(cfg), **extra)


def packed_positions_and_mask(doc_ids: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows ``doc_ids`` (B, T), each example a run of equal ids → the positions (B, T), restarting at
    ``start`` with each example, and the block-diagonal mask (B, 1, T, start+T): a token sees the ``start``
    cached keys and the tokens of its own example (the causal part is the model's mask). Krell et al. 2021,
    "Efficient Sequence Packing without Cross-contamination", §3."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    positions = start + idx - torch.where(first, idx, 0).cummax(dim=1).values  # (B, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    if start:
        same = torch.cat([same.new_ones(B, T, start), same], dim=-1)
    return positions, same[:, None]


def run_block(layer: nn.Module, x: torch.Tensor, recompute: bool, cache: Any = None, **kw: Any) -> torch.Tensor:
    """One decoder block of a layer stack. ``recompute`` (gradient checkpointing; Chen et al. 2016, "Training
    Deep Nets with Sublinear Memory Cost", §3): the block's activations are dropped after the forward and
    recomputed in the backward (``torch.utils.checkpoint``, non-reentrant, RNG state replayed), so training
    holds one block's activations plus each block's input. A cache (prefix tuning's prefix) is copied per
    call, so the recomputation sees it as the forward did."""
    if not recompute:
        return layer(x, cache=cache, **kw)
    return checkpoint(lambda h: layer(h, cache=copy.copy(cache), **kw), x, use_reentrant=False)


class Llama(nn.Module):
    """Decoder-only Transformer: embeddings, ``n_layers`` pre-norm TransformerLayers, RMSNorm, LM head.

    ``gradient_checkpointing``: in training, each block is recomputed in the backward (:func:`run_block`).
    """

    gradient_checkpointing: bool = False

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe = None
        if cfg.n_experts:
            moe = {"n_experts": cfg.n_experts, "top_k": cfg.n_experts_per_tok, "d_ff": cfg.moe_d_ff or cfg.d_ff,
                   "norm_topk_prob": cfg.norm_topk_prob}
        self.layers = nn.ModuleList(
            TransformerLayer(
                cfg.d_model, cfg.n_heads, cfg.d_ff, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.hd,
                norm_first=True, norm="rmsnorm", norm_eps=cfg.norm_eps,
                ffn={"silu": "swiglu", "gelu_tanh": "geglu"}[cfg.act],
                bias=cfg.mlp_bias, attn_bias=cfg.qkv_bias, attn_out_bias=cfg.o_bias, norm_offset=cfg.norm_offset,
                post_norms=cfg.post_norms, qk_norm=cfg.qk_norm, attn_scale=cfg.attn_scale,
                attn_softcap=cfg.attn_softcap, window=cfg.window(i), moe=moe,
            )
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output_head: nn.Module | None = None  # replaces the LM head when set (attnkit.quant: a quantized head)
        # inv_freq is built on the CPU explicitly so the model can be constructed on the meta device
        self.rotary = rotary_embedding(cfg)
        self.rotary_local: RotaryEmbedding | None = None  # Gemma 3: the windowed layers' own RoPE
        if cfg.rope_local_theta is not None:
            local = replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None, rope_freq_factors=None)
            self.rotary_local = RotaryEmbedding(cfg.hd, rotary_dim=cfg.rotary_dim, inv_freq=rope_inv_freq(local))

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def forward(self, idx: torch.Tensor | None, cache: list[KVCache] | None = None, last_only: bool = False,
                positions: torch.Tensor | None = None, logits_indices: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                hidden_only: bool = False) -> torch.Tensor:
        """idx: (B, T) token ids → logits (B, T, vocab) (or (B, 1, vocab) with ``last_only``).

        With ``cache`` the tokens continue the cached sequence: their positions start at its length.
        The inference engine passes explicit ``positions`` (T,) of its packed row of many sequences,
        a per-layer cache that masks by itself, and ``logits_indices``: the only rows it needs logits of.
        ``inputs_embeds`` (B, T, d) replaces the embedding lookup and its ``embed_scale`` (soft prompts, P-tuning).
        ``doc_ids`` (B, T): the examples of packed rows (runs of equal ids; :func:`packed_positions_and_mask`) —
        each attends only to itself (and to a cache's keys: prefix tuning's prefix), positions restarting at 0.
        ``hidden_only``: the last layer's output (B, T, d) before :meth:`logits` (a loss that never holds all logits:
        attnkit.train.chunked_loss).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) and inputs_embeds")
        B, T = idx.shape if idx is not None else inputs_embeds.shape[:2]  # type: ignore[union-attr]
        device = idx.device if idx is not None else inputs_embeds.device  # type: ignore[union-attr]
        masks: dict[int | None, torch.Tensor | None] = {}  # one mask per distinct window
        seq_len = None  # the engine's explicit positions: length-dependent RoPE per position (RotaryEmbedding)
        if doc_ids is not None:
            if positions is not None:
                raise ValueError("pass at most one of positions and doc_ids")
            start = cache[0].length if cache is not None else 0
            positions, same_doc = packed_positions_and_mask(doc_ids, start)  # (B, T), (B, 1, T, start+T)
            seq_len = int(positions.max()) + 1  # dynamic NTK: the longest example (not each its own)
            key_pos = torch.cat([torch.arange(start, device=device).expand(B, start), positions], dim=1)
            for i in range(len(self.layers)):
                w = self.cfg.window(i)
                if w not in masks:  # causal in the row's order; a window counts positions within the example
                    masks[w] = same_doc & causal_mask(T, start + T, device=device)
                    if w is not None:
                        masks[w] = masks[w] & (positions[:, None, :, None] - key_pos[:, None, None, :] < w)
        elif positions is None:
            start = cache[0].length if cache is not None else 0
            seq_len = start + T  # as transformers: max(position_ids) + 1 for every token of this pass
            positions = torch.arange(start, start + T, device=device)  # (T,)
            for i in range(len(self.layers)):
                w = self.cfg.window(i)
                if w not in masks:
                    masks[w] = self._mask(T, start + T, device, w)  # (T, start+T) or None
        if inputs_embeds is None:
            x = self.tok_embeddings(idx)  # (B, T, d)
            if self.cfg.embed_scale != 1.0:  # Gemma: the normaliser √d rounded to the activations' dtype
                x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        else:  # taken as they are, already scaled (as transformers' inputs_embeds and llama.cpp's embeddings input)
            x = inputs_embeds
        rotary = self.rotary.at(positions, seq_len)  # the angles once for all layers
        local = self.rotary_local.at(positions) if self.rotary_local is not None else rotary
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            # without explicit positions the mask is ours; with them the cache (the engine's paged KV) knows
            # which keys each token may see
            w = self.cfg.window(i)
            x = run_block(layer, x, recompute, None if cache is None else cache[i], mask=masks.get(w),
                          rotary=local if w is not None else rotary, positions=positions)
        if logits_indices is not None:
            x = x[:, logits_indices]
        x = x[:, -1:] if last_only else x
        return x if hidden_only else self.logits(x)

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's (vocab, d) weight where it is a plain matrix — the tied embedding's or ``lm_head``'s — or
        None where ``output_head`` (a quantized head) replaces it."""
        if self.output_head is not None:
            return None
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def head_parts(self) -> tuple[nn.Module, torch.Tensor] | None:
        """(the final norm, the head's plain weight) where :meth:`logits` is exactly ``F.linear(norm(h), weight)`` —
        no soft-capping, no quantized head — else None."""
        w = self.head_weight()
        return None if w is None or self.cfg.final_softcap is not None else (self.norm, w)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, T, d) → RMSNorm → LM head → logits (B, T, vocab)."""
        x = self.norm(h)
        w = self.head_weight()
        logits = self.output_head(x) if w is None else F.linear(x, w)  # (B, T, vocab)
        if self.cfg.final_softcap is not None:  # Gemma 2: c·tanh(logits/c)
            c = self.cfg.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits

    def _mask(self, q_len: int, k_len: int, device: torch.device, w: int | None) -> torch.Tensor | None:
        if q_len == 1 and (w is None or k_len <= w):
            return None  # one new token may attend to every cached one
        mask = causal_mask(q_len, k_len, device=device)
        if w is not None:  # query at absolute position i sees keys j with i − j < w
            i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
            mask = mask & (i - torch.arange(k_len, device=device)[None, :] < w)
        return mask


# -- the checkpoints of the family --------------------------------------------------------------
def _llama_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    return replace(cfg, o_bias=bool(c.get("attention_bias", False)))


def _mistral_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    return replace(cfg, sliding_window=c.get("sliding_window"))


def _qwen2_hf(cfg: LlamaConfig, c: dict[str, Any]) -> LlamaConfig:
    if c.get("use_sliding_window", False):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")
    return replace(cfg, qkv_bias=True)


def _llama_gguf(cfg: LlamaConfig, get, tensors: dict[str, Any]) -> LlamaConfig:
    """A llama file with expert tensors is a Mixtral (:func:`attnkit.models.moe.llama_gguf`)."""
    from .moe import llama_gguf  # not at import: the moe module registers its families after these

    return llama_gguf(cfg, get, tensors)


_ALL = {"HF": "yes", "GGUF": "yes", "engine": "yes", "C step": "yes", "LoRA": "yes"}
register(Family("llama", hf_types=("llama",), gguf_archs=("llama",), hf_config=_llama_hf, gguf_config=_llama_gguf,
                permute_qk=True, supports=_ALL, example="Llama-3.2-1B, SmolLM2"))
register(Family("mistral", hf_types=("mistral",), hf_config=_mistral_hf,
                supports={**_ALL, "GGUF": "yes (as llama)", "C step": "yes"},
                example="Mistral-7B-v0.1"))
register(Family("qwen2", hf_types=("qwen2",), gguf_archs=("qwen2",), hf_config=_qwen2_hf, supports=_ALL,
                example="Qwen2.5-0.5B"))
