"""GGUF checkpoints → attnkit models: metadata → config, tensor names → parameters.

Supported architectures (``general.architecture``): ``llama`` (Llama 1/2/3, Mistral, SmolLM — llama.cpp
writes them all as llama) and ``qwen2``. llama.cpp's converter permutes the rows of the Q and K
projections of ``llama`` files so that its RoPE can rotate adjacent pairs (x_{2i}, x_{2i+1}); our
RotaryEmbedding rotates the half-split pairs (x_i, x_{i+d/2}) of the HF layout, so the permutation
is undone on load (:func:`unpermute_qk`). Llama-3 frequency scaling arrives as a ``rope_freqs``
tensor of per-frequency divisors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.llama import Llama, LlamaConfig
from .common import Plan, check_leftovers, check_present, expected_shapes, materialize
from .errors import ModelLoadError, UnsupportedModelError
from .gguf_file import GGUFFile

ARCHITECTURES = ("llama", "qwen2")

_RULES = [  # (our-name regex, GGUF-name template)
    (r"tok_embeddings\.weight", "token_embd.weight"),
    (r"norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"layers\.(\d+)\.norm1\.weight", r"blk.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.norm2\.weight", r"blk.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(\w+)", r"blk.\1.attn_q.\2"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(\w+)", r"blk.\1.attn_k.\2"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(\w+)", r"blk.\1.attn_v.\2"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(\w+)", r"blk.\1.attn_output.\2"),
    (r"layers\.(\d+)\.ffn\.(gate|up|down)_proj\.(\w+)", r"blk.\1.ffn_\2.\3"),
]
_IGNORE = [r"rope_freqs\.weight"]  # folded into the config


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: rows (head, i, pair) → (head, pair, i) for each of ``n_heads`` heads.

    convert_hf_to_gguf.py: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(g: GGUFFile) -> LlamaConfig:
    m, t = g.metadata, g.tensors
    arch = m.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(g.path, f"architecture {arch!r} is not supported for GGUF files "
                                            f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = m.get(f"{arch}.{key}", default)
        if required and v is None:
            raise ModelLoadError(g.path, f"metadata key {arch}.{key} is missing")
        if isinstance(v, list):
            raise UnsupportedModelError(g.path, f"per-layer values for {arch}.{key} are not supported")
        return v

    d, nh = get("embedding_length", required=True), get("attention.head_count", required=True)
    head_dim = get("attention.key_length", d // nh)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(g.path, "partial rotary embeddings (rope.dimension_count < head dim) are not supported")
    if "token_embd.weight" not in t:
        raise ModelLoadError(g.path, "missing tensor", tensor="token_embd.weight")
    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif kind not in ("none", None):
        raise UnsupportedModelError(
            g.path, f"RoPE scaling {kind!r} is not supported (supported: none, linear, llama3 via rope_freqs)")
    factors = g.load("rope_freqs.weight").astype(np.float64).tolist() if "rope_freqs.weight" in t else None
    return LlamaConfig(
        vocab_size=t["token_embd.weight"].shape[0], d_model=d, n_layers=get("block_count", required=True),
        n_heads=nh, n_kv_heads=get("attention.head_count_kv", nh), d_ff=get("feed_forward_length", required=True),
        head_dim=head_dim, norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling, rope_freq_factors=factors,
        max_seq_len=int(get("context_length", 4096)), tie_embeddings="output.weight" not in t,
        qkv_bias="blk.0.attn_q.bias" in t, o_bias="blk.0.attn_output.bias" in t,
        mlp_bias="blk.0.ffn_up.bias" in t, extra={"gguf_architecture": arch},
    )


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, g: GGUFFile | None = None) -> Llama:
    """The model of a GGUF file, fully loaded (dequantised to ``dtype``) or a :class:`ModelLoadError`."""
    g = GGUFFile(path) if g is None else g
    cfg = gguf_config(g)
    model, shapes = expected_shapes(Llama, cfg)
    permuted = cfg.extra["gguf_architecture"] == "llama"

    def loader(src: str, ours: str):
        def load() -> torch.Tensor:
            w = torch.from_numpy(g.load(src))
            if permuted and src.endswith(("attn_q.weight", "attn_q.bias")):
                w = unpermute_qk(w, cfg.n_heads)
            elif permuted and src.endswith(("attn_k.weight", "attn_k.bias")):
                w = unpermute_qk(w, cfg.n_kv_heads)
            return w
        return load

    plan: Plan = {}
    for ours in shapes:
        src = next(re.fullmatch(p, ours).expand(tpl) for p, tpl in _RULES if re.fullmatch(p, ours))
        plan[ours] = (src, loader(src, ours))
    check_present(g.path, plan, g.tensors)
    check_leftovers(g.path, plan, g.tensors, _IGNORE)
    for src, _ in plan.values():  # refuse unsupported tensor types before dequantising anything
        g.check_type(src)
    return materialize(model, shapes, plan, g.path, dtype)
