"""Llama-, Qwen3- and Qwen3-MoE-shaped GGUF files with random weights: models of a real model's size to
measure speed and memory on.

:func:`write_llama_gguf` writes a ``general.architecture = llama`` file the shape of Llama-3.2-1B or -3B (or
any shape given as a dict) with Gaussian weights (std 0.02; RMSNorm weights around 1), the tokenizer metadata
of another GGUF file (default: the embedded SmolLM2-135M's, a 49 152-token vocabulary) and tied embeddings as
Llama-3.2 has. The weights are made and written one tensor at a time, so a 3B file needs little more memory
than its largest tensor. ``preset`` picks the tensor types as llama-quantize would (F16, Q8_0, Q4_K_M, …; see
:mod:`attnkit.quant.gguf_quantize`). Random weights make llama.cpp's Q/K row permutation irrelevant and the
model's text meaningless: outputs are finite and the logits spread, nothing more.

A shape's ``arch`` (default ``llama``) picks llama.cpp's architecture: ``qwen3`` adds the per-head q/k norms
(``attn_q_norm``, ``attn_k_norm``), ``qwen3moe`` also replaces each FFN by ``n_experts`` experts of
``moe_d_ff`` (``ffn_gate_inp`` router in F32 as the converter writes it, ``ffn_{gate,up,down}_exps``) of
which ``n_experts_per_tok`` run per token — the tensors and metadata keys of convert_hf_to_gguf.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Llama-3.2's shapes (HF config.json), and a tiny one for tests
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {"d_model": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "d_ff": 8192,
                     "rope_theta": 500000.0, "context_length": 131072, "norm_eps": 1e-5},
    "llama-3.2-3b": {"d_model": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "d_ff": 8192,
                     "rope_theta": 500000.0, "context_length": 131072, "norm_eps": 1e-5},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
             "rope_theta": 10000.0, "context_length": 2048, "norm_eps": 1e-5},
    # Qwen3-1.7B's config.json (tied embeddings, head_dim 128 ≠ d_model / n_heads)
    "qwen3-1.7b": {"arch": "qwen3", "d_model": 2048, "n_layers": 28, "n_heads": 16, "n_kv_heads": 8, "head_dim": 128,
                   "d_ff": 6144, "rope_theta": 1000000.0, "context_length": 40960, "norm_eps": 1e-6},
    # a Qwen3-MoE of 2.6B parameters, 0.48B of them active per token (Qwen3-30B-A3B's layout scaled down:
    # 64 experts of 512, 8 per token, GQA 16:4 of head_dim 128)
    "qwen3-moe-2.6b-a0.5b": {"arch": "qwen3moe", "d_model": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 4,
                             "head_dim": 128, "d_ff": 3072, "n_experts": 64, "n_experts_per_tok": 8, "moe_d_ff": 512,
                             "rope_theta": 1000000.0, "context_length": 40960, "norm_eps": 1e-6},
    "tiny-qwen3": {"arch": "qwen3", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
                   "d_ff": 128, "rope_theta": 10000.0, "context_length": 2048, "norm_eps": 1e-6},
    # a small Qwen3-MoE (131M parameters, 43M active; F16 262 MB) for measuring on a shared machine
    "small-qwen3moe": {"arch": "qwen3moe", "d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "head_dim": 64,
                       "d_ff": 1024, "n_experts": 32, "n_experts_per_tok": 4, "moe_d_ff": 256, "rope_theta": 1000000.0,
                       "context_length": 40960, "norm_eps": 1e-6},
    "tiny-qwen3moe": {"arch": "qwen3moe", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
                      "d_ff": 128, "n_experts": 8, "n_experts_per_tok": 2, "moe_d_ff": 32, "rope_theta": 10000.0,
                      "context_length": 2048, "norm_eps": 1e-6},
    # Gemma-3-1B's config.json but the vocabulary (the default tokenizer's 49,152 tokens, not Gemma's 262,144): five
    # windowed layers of 512 keys to one global, head_dim 256, one KV head, q/k norms, sandwich norms, GeGLU
    "gemma3-1b": {"arch": "gemma3", "d_model": 1152, "n_layers": 26, "n_heads": 4, "n_kv_heads": 1, "head_dim": 256,
                  "d_ff": 6912, "sliding_window": 512, "rope_theta": 1000000.0, "rope_local_theta": 10000.0,
                  "context_length": 32768, "norm_eps": 1e-6},
    "tiny-gemma3": {"arch": "gemma3", "d_model": 64, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
                    "d_ff": 128, "sliding_window": 8, "rope_theta": 1000000.0, "rope_local_theta": 10000.0,
                    "context_length": 2048, "norm_eps": 1e-6},
}
ARCHS = ("llama", "qwen3", "qwen3moe", "gemma3")
_DEFAULTS = {"rope_theta": 500000.0, "context_length": 4096, "norm_eps": 1e-5, "tied_embeddings": True,
             "weight_std": 0.02, "norm_std": 0.1}


def llama_shape(shape: dict | str) -> dict[str, Any]:
    """A shape by name (:data:`SHAPES`) or a dict with d_model, n_layers, n_heads, n_kv_heads, d_ff (and
    optionally vocab_size, rope_theta, context_length, norm_eps, tied_embeddings, head_dim), defaults filled in."""
    if isinstance(shape, str):
        key = shape.lower()
        if key not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)}; or a dict)")
        shape = SHAPES[key]
    missing = [k for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff") if k not in shape]
    if missing:
        raise ValueError(f"shape lacks {', '.join(missing)}")
    out = {"arch": "llama", **_DEFAULTS, **shape}
    out.setdefault("head_dim", out["d_model"] // out["n_heads"])
    if out["arch"] not in ARCHS:
        raise ValueError(f"unknown arch {out['arch']!r} (known: {', '.join(ARCHS)})")
    if out["arch"] == "qwen3moe" and not all(out.get(k) for k in ("n_experts", "n_experts_per_tok", "moe_d_ff")):
        raise ValueError("a qwen3moe shape needs n_experts, n_experts_per_tok and moe_d_ff")
    return out


def param_counts(s: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(total, active per token) parameters of a shape: the active count has n_experts_per_tok of the experts."""
    total = active = 0
    for name, shp in tensor_shapes(s, vocab_size):
        n = int(np.prod(shp))
        total += n
        active += n * s["n_experts_per_tok"] // s["n_experts"] if "_exps." in name else n
    return total, active


def tensor_shapes(s: dict[str, Any], vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, PyTorch shape) of every tensor, in the order llama.cpp's converter writes them."""
    d, hd, L, arch = s["d_model"], s["head_dim"], s["n_layers"], s.get("arch", "llama")
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab_size, d))]
    for i in range(L):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (s["n_heads"] * hd, d)),
                (b + "attn_k.weight", (s["n_kv_heads"] * hd, d)), (b + "attn_v.weight", (s["n_kv_heads"] * hd, d)),
                (b + "attn_output.weight", (d, s["n_heads"] * hd))]
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
        if arch == "gemma3":  # sandwich norms: each sublayer's output normalised before the residual add
            out += [(b + "post_attention_norm.weight", (d,)), (b + "post_ffw_norm.weight", (d,))]
        out.append((b + "ffn_norm.weight", (d,)))
        if arch == "qwen3moe":
            E, ff = s["n_experts"], s["moe_d_ff"]
            out += [(b + "ffn_gate_inp.weight", (E, d)), (b + "ffn_gate_exps.weight", (E, ff, d)),
                    (b + "ffn_up_exps.weight", (E, ff, d)), (b + "ffn_down_exps.weight", (E, d, ff))]
        else:
            out += [(b + "ffn_gate.weight", (s["d_ff"], d)), (b + "ffn_up.weight", (s["d_ff"], d)),
                    (b + "ffn_down.weight", (d, s["d_ff"]))]
    out.append(("output_norm.weight", (d,)))
    if not s["tied_embeddings"]:
        out.append(("output.weight", (vocab_size, d)))
    return out


def _random(name: str, shape: tuple[int, ...], s: dict[str, Any], seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:  # RMSNorm weights: around 1
        return x * np.float32(s["norm_std"]) + np.float32(1)
    return x * np.float32(s["weight_std"])


def write_llama_gguf(path: str | Path, shape: dict | str, preset: str = "F16", tokenizer_from: str | Path | None = None,
                     seed: int = 0, threads: int | None = None, progress: bool = False,
                     name: str | None = None) -> Path:
    """Write a random-weight GGUF of ``shape`` (see :func:`llama_shape`; its ``arch``) in ``preset`` to ``path``.

    The tokenizer metadata (every ``tokenizer.*`` key, with its value types) comes from ``tokenizer_from``
    (default: the embedded SmolLM2-135M GGUF); the vocabulary size is its token count unless the shape sets
    ``vocab_size``. The file is written to a temporary name and renamed at the end, so an interrupted write
    leaves no half file under ``path``. Returns ``path``.
    """
    import gguf
    from gguf import GGMLQuantizationType

    from ..quant.gguf_quantize import PRESETS, check_preset, quantize_rows, read_metadata, row_bytes, tensor_type
    from .defaults import default_chat_model

    preset = check_preset(preset)
    s = llama_shape(shape)
    path = Path(path)
    src = Path(tokenizer_from) if tokenizer_from is not None else default_chat_model()
    tok = {k: v for k, v in read_metadata(src).items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in tok:
        raise ValueError(f"{src} has no tokenizer.ggml.tokens to copy")
    vocab = int(s.get("vocab_size") or len(tok["tokenizer.ggml.tokens"][0]))
    tensors = tensor_shapes(s, vocab)
    types = {n: "F32" if n.endswith("ffn_gate_inp.weight") else  # the converter keeps the router in F32
             tensor_type(preset, n, s["n_layers"], shp, s["tied_embeddings"], "F32") for n, shp in tensors}
    arch = s["arch"]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, arch)
    n_params = sum(int(np.prod(shp)) for _, shp in tensors)
    w.add_string("general.type", "model")
    w.add_string("general.name", name or f"random {arch} {s['d_model']}x{s['n_layers']} ({n_params / 1e9:.2f}B)")
    w.add_string("general.size_label", f"{n_params / 1e9:.1f}B")
    w.add_uint32(f"{arch}.block_count", s["n_layers"])
    w.add_uint32(f"{arch}.context_length", int(s["context_length"]))
    w.add_uint32(f"{arch}.embedding_length", s["d_model"])
    w.add_uint32(f"{arch}.feed_forward_length", s["d_ff"])
    w.add_uint32(f"{arch}.attention.head_count", s["n_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", s["n_kv_heads"])
    w.add_float32(f"{arch}.rope.freq_base", float(s["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(s["norm_eps"]))
    if s["head_dim"] != s["d_model"] // s["n_heads"]:
        w.add_uint32(f"{arch}.attention.key_length", s["head_dim"])
        w.add_uint32(f"{arch}.attention.value_length", s["head_dim"])
    if arch == "qwen3moe":
        w.add_uint32(f"{arch}.expert_count", s["n_experts"])
        w.add_uint32(f"{arch}.expert_used_count", s["n_experts_per_tok"])
        w.add_uint32(f"{arch}.expert_feed_forward_length", s["moe_d_ff"])
    if arch == "gemma3":  # llama.cpp's gemma3: windowed layers (5 of every 6) with their own RoPE base
        w.add_uint32(f"{arch}.attention.sliding_window", s["sliding_window"])
        w.add_float32(f"{arch}.rope.freq_base_swa", float(s["rope_local_theta"]))
    w.add_uint32(f"{arch}.rope.dimension_count", s["head_dim"])
    w.add_uint32(f"{arch}.vocab_size", vocab)
    w.add_uint32("general.file_type", PRESETS[preset][0])
    if PRESETS[preset][1] not in ("F32", "F16", "BF16"):
        w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    for key, (val, vtype, sub) in tok.items():
        w.add_key_value(key, val, vtype, sub)
    for n, shp in tensors:
        qt = GGMLQuantizationType[types[n]]
        nbytes = int(np.prod(shp[:-1], dtype=np.int64)) * row_bytes(types[n], shp[-1])
        w.add_tensor_info(n, list(shp), np.dtype(np.float32), nbytes, raw_dtype=qt)  # float32: the shape as given
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_params, desc=f"write {path.name}", unit="param", unit_scale=True)
    try:
        for i, (n, shp) in enumerate(tensors):
            x = _random(n, shp, s, seed, i)
            data = quantize_rows(x.reshape(-1, shp[-1]), types[n], threads)
            del x
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            if bar is not None:
                bar.update(int(np.prod(shp)))
        w.close()
        tmp.replace(path)
    finally:
        if bar is not None:
            bar.close()
        w.close()
        if tmp.exists():
            tmp.unlink()
    return path
