"""Llama-shaped GGUF files with random weights: models of a real model's size to measure speed and memory on.

:func:`write_llama_gguf` writes a ``general.architecture = llama`` file the shape of Llama-3.2-1B or -3B (or
any shape given as a dict) with Gaussian weights (std 0.02; RMSNorm weights around 1), the tokenizer metadata
of another GGUF file (default: the embedded SmolLM2-135M's, a 49 152-token vocabulary) and tied embeddings as
Llama-3.2 has. The weights are made and written one tensor at a time, so a 3B file needs little more memory
than its largest tensor. ``preset`` picks the tensor types as llama-quantize would (F16, Q8_0, Q4_K_M, …; see
:mod:`attnkit.quant.gguf_quantize`). Random weights make llama.cpp's Q/K row permutation irrelevant and the
model's text meaningless: outputs are finite and the logits spread, nothing more.
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
}
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
    out = {**_DEFAULTS, **shape}
    out.setdefault("head_dim", out["d_model"] // out["n_heads"])
    return out


def tensor_shapes(s: dict[str, Any], vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, PyTorch shape) of every tensor, in the order llama.cpp's converter writes them."""
    d, hd, L = s["d_model"], s["head_dim"], s["n_layers"]
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab_size, d))]
    for i in range(L):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (s["n_heads"] * hd, d)),
                (b + "attn_k.weight", (s["n_kv_heads"] * hd, d)), (b + "attn_v.weight", (s["n_kv_heads"] * hd, d)),
                (b + "attn_output.weight", (d, s["n_heads"] * hd)), (b + "ffn_norm.weight", (d,)),
                (b + "ffn_gate.weight", (s["d_ff"], d)), (b + "ffn_up.weight", (s["d_ff"], d)),
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
    """Write a random-weight llama GGUF of ``shape`` (see :func:`llama_shape`) in ``preset`` to ``path``.

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
    types = {n: tensor_type(preset, n, s["n_layers"], shp, s["tied_embeddings"], "F32") for n, shp in tensors}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    n_params = sum(int(np.prod(shp)) for _, shp in tensors)
    w.add_string("general.type", "model")
    w.add_string("general.name", name or f"random llama {s['d_model']}x{s['n_layers']} ({n_params / 1e9:.2f}B)")
    w.add_string("general.size_label", f"{n_params / 1e9:.1f}B")
    w.add_uint32("llama.block_count", s["n_layers"])
    w.add_uint32("llama.context_length", int(s["context_length"]))
    w.add_uint32("llama.embedding_length", s["d_model"])
    w.add_uint32("llama.feed_forward_length", s["d_ff"])
    w.add_uint32("llama.attention.head_count", s["n_heads"])
    w.add_uint32("llama.attention.head_count_kv", s["n_kv_heads"])
    w.add_float32("llama.rope.freq_base", float(s["rope_theta"]))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", float(s["norm_eps"]))
    if s["head_dim"] != s["d_model"] // s["n_heads"]:
        w.add_uint32("llama.attention.key_length", s["head_dim"])
        w.add_uint32("llama.attention.value_length", s["head_dim"])
    w.add_uint32("llama.rope.dimension_count", s["head_dim"])
    w.add_uint32("llama.vocab_size", vocab)
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
