"""GGUF checkpoints → attnkit models: metadata → config, tensor names → parameters.

Supported architectures (``general.architecture``): those of the registered families
(:mod:`attnkit.models.registry`): ``llama`` (Llama 1/2/3, Mistral, SmolLM — llama.cpp writes them all as
llama), ``qwen2``, ``qwen3`` and the others each family module names. llama.cpp's converter permutes the rows of the Q and K
projections of ``llama`` files so that its RoPE can rotate adjacent pairs (x_{2i}, x_{2i+1}); our
RotaryEmbedding rotates the half-split pairs (x_i, x_{i+d/2}) of the HF layout, so the permutation
is undone on load (:func:`unpermute_qk`). Llama-3 frequency scaling arrives as a ``rope_freqs``
tensor of per-frequency divisors.

With ``quantize="gguf"`` (the default) the linear layers, the output head and the token embeddings keep
the file's own blocks under attnkit's kernels (:mod:`attnkit.quant.native`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K), viewed in place in the file's mapping or repacked; other quantized types (Q2_K, Q3_K,
IQ…) are dequantized at load with a warning that names them. With the PyTorch schemes Q4_0/Q4_1 blocks
become :class:`~attnkit.quant.Int4Linear` codes, scales and zeros bit for bit (group 32); other types
are dequantized and quantized to the scheme asked ("auto": Q8_0 → int8, the rest stay float). The
permutation moves whole rows, and a quantization group runs along a row, so it applies to codes,
scales and zeros alike.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..models import registry
from ..models.llama import Llama, LlamaConfig, rotary_embedding
from ..parallel.tensor import Split, TensorParallel
from .common import Plan, check_leftovers, check_present, expected_shapes, materialize
from .errors import ModelLoadError, UnsupportedModelError
from .gguf_file import GGUFFile
from .gguf_layers import MOE_LINEAR, Q4_TYPES, expert_loader, expert_of, moe_linear, native_linear, warn_dequantized


def architectures() -> tuple[str, ...]:
    """The ``general.architecture`` values attnkit loads (the registered families')."""
    return registry.gguf_archs()


_RULES = [  # (our-name regex, GGUF-name template); a family's own rules are tried first
    (r"layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
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
_IGNORE = [r"rope_freqs\.weight", r"rope_factors_(long|short)\.weight"]  # folded into the config

#: A rule's template may name rows of a fused tensor: ``NAME[part]`` with part q, k, v (llama.cpp's ``attn_qkv``:
#: rows n_heads·hd, n_kv_heads·hd, n_kv_heads·hd in that order) or gate, up (a fused ``ffn_up`` of 2·d_ff rows:
#: gate, then up — Phi-3). Such a rule applies only where the file has the fused tensor (else the next rule
#: that matches: separate attn_q/attn_k/attn_v). A quantization block never spans two rows, so a row slice of
#: the file's blocks is exactly the blocks of the part, dequantized or kept quantized (``quantize="gguf"``).
_PART = re.compile(r"(.+)\[(q|k|v|gate|up)\]")


def _base(src: str) -> str:
    """The file's tensor behind a plan source (``blk.0.attn_qkv.weight[k]`` → ``blk.0.attn_qkv.weight``)."""
    m = _PART.fullmatch(src)
    return m.group(1) if m else src


def _rows(g: GGUFFile, cfg: LlamaConfig, src: str) -> tuple[str, slice | None]:
    """(file tensor, its rows that are ``src``): the whole tensor unless ``src`` names a part of a fused one."""
    m = _PART.fullmatch(src)
    if m is None:
        return src, None
    base, part = m.groups()
    q, kv, ff = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd, cfg.d_ff
    qkv = q + 2 * kv
    total, (start, stop) = {"q": (qkv, (0, q)), "k": (qkv, (q, q + kv)), "v": (qkv, (q + kv, qkv)),
                            "gate": (2 * ff, (0, ff)), "up": (2 * ff, (ff, 2 * ff))}[part]
    rows = g.tensors[base].shape[0]
    if rows != total:
        raise ModelLoadError(g.path, f"the fused tensor has {rows} rows, the config implies {total} "
                                     f"({'q, k, v' if part in 'qkv' else 'gate, up'})", tensor=base)
    return base, slice(start, stop)


def _part_loader(g: GGUFFile, cfg: LlamaConfig, src: str):
    """A loader of a fused tensor's part (float32): only its rows are read and dequantized."""
    from gguf.quants import dequantize

    def load() -> torch.Tensor:
        base, rows = _rows(g, cfg, src)
        t = g.tensors[base]
        g.check_type(base)
        if len(t.shape) == 1:  # a bias: its part of the vector
            return torch.from_numpy(g.load(base)[rows].copy())
        data = np.ascontiguousarray(g.blocks(base)[rows])  # (part rows, row bytes)
        return torch.from_numpy(dequantize(data, t.ggml_type).reshape(-1, *t.shape[1:]).astype(np.float32))

    return load


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: rows (head, i, pair) → (head, pair, i) for each of ``n_heads`` heads.

    convert_hf_to_gguf.py: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(g: GGUFFile) -> LlamaConfig:
    m, t = g.metadata, g.tensors
    arch = m.get("general.architecture")
    family = registry.by_gguf_arch(arch) if isinstance(arch, str) else None
    if family is None:
        raise UnsupportedModelError(g.path, f"architecture {arch!r} is not supported for GGUF files "
                                            f"(supported: {', '.join(architectures())})")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = m.get(f"{arch}.{key}", default)
        if required and v is None:
            raise ModelLoadError(g.path, f"metadata key {arch}.{key} is missing")
        if isinstance(v, list):
            raise UnsupportedModelError(g.path, f"per-layer values for {arch}.{key} are not supported")
        return v

    d, nh = get("embedding_length", required=True), get("attention.head_count", required=True)
    head_dim = get("attention.key_length", d // nh)
    n_rot = int(get("rope.dimension_count", head_dim))  # partial rotary (Phi-4-mini) where it is below the head dim
    if n_rot != head_dim and (family.permute_qk or n_rot % 2 or not 0 < n_rot < head_dim):
        raise UnsupportedModelError(g.path, f"rope.dimension_count {n_rot} with head dim {head_dim} is not supported "
                                            "(partial rotary: an even count below the head dim, on an architecture "
                                            "whose Q/K rows llama.cpp does not permute)")
    if "token_embd.weight" not in t:
        raise ModelLoadError(g.path, "missing tensor", tensor="token_embd.weight")
    scaling = _gguf_rope_scaling(g, get)
    factors = g.load("rope_freqs.weight").astype(np.float64).tolist() if "rope_freqs.weight" in t else None
    cfg = LlamaConfig(
        vocab_size=t["token_embd.weight"].shape[0], d_model=d, n_layers=get("block_count", required=True),
        n_heads=nh, n_kv_heads=get("attention.head_count_kv", nh), d_ff=get("feed_forward_length", required=True),
        head_dim=head_dim, partial_rotary=n_rot / head_dim, norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling, rope_freq_factors=factors,
        max_seq_len=int(get("context_length", 4096)), tie_embeddings="output.weight" not in t,
        qkv_bias="blk.0.attn_q.bias" in t, o_bias="blk.0.attn_output.bias" in t,
        mlp_bias="blk.0.ffn_up.bias" in t, extra={"gguf_architecture": arch, "family": family.name},
    )
    if family.gguf_config is not None:
        try:
            cfg = family.gguf_config(cfg, get, t)
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(g.path, f"{arch}: {e}") from e
    if cfg.rotary_dim != n_rot:  # n_rot / head_dim · head_dim rounded below n_rot by the float division
        cfg = replace(cfg, partial_rotary=(n_rot + 0.5) / head_dim)
    try:
        rotary_embedding(cfg)  # the RoPE scaling's parameters, checked before any weight is read
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(g.path, f"RoPE: {e}") from e
    return cfg


def _gguf_rope_scaling(g: GGUFFile, get) -> dict[str, Any] | None:
    """The RoPE scaling of a GGUF file, in config.json's terms (:func:`attnkit.models.llama.rope_inv_freq`).

    llama.cpp's converter writes ``rope.scaling.type`` linear (+ ``factor``) or yarn (+ ``factor``,
    ``original_context_length``, ``yarn_beta_fast`` / ``yarn_beta_slow`` / ``yarn_attn_factor`` where the
    checkpoint had them); Llama 3's scaling as a ``rope_freqs`` tensor (read by the caller); LongRoPE (Phi-3)
    as the tensors ``rope_factors_long`` / ``rope_factors_short`` with ``rope.scaling.original_context_length``
    and ``rope.scaling.attn_factor`` (the type is often not written at all).
    """
    t = g.tensors
    kind = get("rope.scaling.type", "none")
    orig = get("rope.scaling.original_context_length")
    if "rope_factors_long.weight" in t or "rope_factors_short.weight" in t:
        if kind not in ("none", None, "longrope"):
            raise UnsupportedModelError(g.path, f"rope_factors_long/short tensors with RoPE scaling {kind!r}")
        if "rope_factors_long.weight" not in t or "rope_factors_short.weight" not in t:
            raise ModelLoadError(g.path, "LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight")
        if orig is None:
            raise ModelLoadError(g.path, "LongRoPE factors without rope.scaling.original_context_length")
        sc: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": int(orig),
                              "long_factor": g.load("rope_factors_long.weight").astype(np.float64).tolist(),
                              "short_factor": g.load("rope_factors_short.weight").astype(np.float64).tolist()}
        if get("rope.scaling.attn_factor") is not None:
            sc["attention_factor"] = float(get("rope.scaling.attn_factor"))
        return sc
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    if kind == "yarn":
        if get("rope.scaling.yarn_log_multiplier") is not None or get("rope.scaling.yarn_ext_factor", 1.0) != 1.0:
            raise UnsupportedModelError(g.path, "YaRN with rope.scaling.yarn_log_multiplier or yarn_ext_factor ≠ 1 "
                                                "is not supported")
        sc = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor", required=True))}
        if orig is not None:
            sc["original_max_position_embeddings"] = int(orig)
        for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if get(f"rope.scaling.{key}") is not None:
                sc[ours] = float(get(f"rope.scaling.{key}"))
        return sc
    raise UnsupportedModelError(
        g.path, f"RoPE scaling {kind!r} is not supported (supported: none, linear, yarn, llama3 via rope_freqs, "
                "longrope via rope_factors_long/short)")


def _rules(cfg: LlamaConfig) -> list[tuple[str, str]]:
    return [*registry.by_name(cfg.extra["family"]).gguf_rules, *_RULES]


def _ignore(cfg: LlamaConfig) -> list[str]:
    return [*registry.by_name(cfg.extra["family"]).gguf_ignore, *_IGNORE]


def _permuted_heads(cfg: LlamaConfig, src: str) -> int | None:
    """The head count to un-permute the rows of ``src`` by, or None (not a llama Q/K tensor)."""
    if not registry.by_name(cfg.extra["family"]).permute_qk:
        return None
    if src.endswith(("attn_q.weight", "attn_q.bias")):
        return cfg.n_heads
    if src.endswith(("attn_k.weight", "attn_k.bias")):
        return cfg.n_kv_heads
    return None


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, g: GGUFFile | None = None,
                    quantize: str | None = None, group_size: int = 32,
                    compute_dtype: torch.dtype = torch.bfloat16, tp: TensorParallel | None = None) -> Llama:
    """The model of a GGUF file, fully loaded or a :class:`ModelLoadError`.

    ``quantize=None``: every weight dequantised to ``dtype``. "gguf": Q4_0/Q4_1/Q8_0 linear layers and head
    keep the file's blocks under attnkit's own kernel (:mod:`attnkit.quant.native`; other types as "auto").
    "auto" | "int8" | "int4": linear layers and
    the output head quantized (see the module docstring); embeddings, norms and biases in ``dtype``;
    the quantized kernels run in ``compute_dtype`` (their scales' dtype: bfloat16 is the fast one).
    ``tp``: this rank's slice only (:mod:`attnkit.parallel.tensor`), each tensor read sliced.
    """
    from ..quant.quantize import check_scheme

    check_scheme(quantize, ("auto", "gguf", "int8", "int4"))
    g = GGUFFile(path) if g is None else g
    cfg = gguf_config(g)
    model, shapes = expected_shapes(Llama, cfg if tp is None else tp.local_config(cfg))

    def loader(src: str, ours: str):
        def load() -> torch.Tensor:
            w = torch.from_numpy(g.load(src))
            heads = _permuted_heads(cfg, src)
            return w if heads is None else unpermute_qk(w, heads)
        return load

    plan: Plan = {}
    rules = _rules(cfg)
    for ours in shapes:
        srcs = [re.fullmatch(p, ours).expand(tpl) for p, tpl in rules if re.fullmatch(p, ours)]
        # a rule naming part of a fused tensor (_PART) applies where the file has that tensor
        src = next((s for s in srcs if not _PART.fullmatch(s) or _base(s) in g.tensors), srcs[0])
        if _PART.fullmatch(src):
            plan[ours] = (src, _part_loader(g, cfg, src))
            continue
        e = expert_of(ours)  # one expert's rows of a layer's stacked expert tensor
        plan[ours] = (src, loader(src, ours) if e is None else expert_loader(g, src, e))
    files = {ours: (_base(src), load) for ours, (src, load) in plan.items()}  # the file's tensors (parts: whole)
    check_present(g.path, files, g.tensors)
    check_leftovers(g.path, files, g.tensors, _ignore(cfg))
    for src, _ in files.values():  # refuse unsupported tensor types before dequantising anything
        g.check_type(src)
    if tp is not None:
        plan = tp.shard_plan(plan, cfg)
    if quantize is None:
        return materialize(model, shapes, plan, g.path, dtype)
    return _materialize_quantized(model, shapes, plan, g, cfg, dtype, quantize, group_size, compute_dtype, tp)




def quantized_linear(g: GGUFFile, cfg: LlamaConfig, src: str, scheme: str, group_size: int,
                     bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                     split: Split | None = None) -> nn.Module | None:
    """The quantized layer of GGUF weight ``src`` (None: "auto" keeps this tensor type in float); ``split``: only
    those rows or columns of it (a tensor-parallel rank's, :mod:`attnkit.parallel.tensor`)."""
    from ..quant import Int4Linear, Int8Linear, quantize_weight

    heads = _permuted_heads(cfg, src)
    src, part = _rows(g, cfg, src)  # part: the rows of a fused tensor (_PART), or None
    kind = g.tensors[src].ggml_type
    row_split = split if split is not None and split.dim == 0 else None
    col_split = split if split is not None and split.dim == 1 else None

    def rows(a: torch.Tensor) -> torch.Tensor:
        a = a if part is None else a[part]
        a = a if heads is None else unpermute_qk(a, heads)
        return a if row_split is None else row_split.of(a)

    def cols(a: torch.Tensor, per: int = 1) -> torch.Tensor:  # ``per`` columns of the weight per column of ``a``
        if col_split is None:
            return a
        if col_split.start % per or col_split.stop % per:
            raise ModelLoadError(g.path, f"columns {col_split.start}…{col_split.stop} of a tensor-parallel rank do "
                                         f"not fall on its groups of {per}", tensor=src)
        return Split(1, col_split.start // per, col_split.stop // per, col_split.size // per).of(a)

    if scheme == "gguf":  # the file's blocks under attnkit's kernel; else what "auto" would do
        fused = _FUSED.fullmatch(src) or part is not None  # a fused tensor's parts are fused again (attnkit.nn.fused)
        native = native_linear(g, src, rows, bias, interleaved=False if fused else None, cols=col_split)
        if native is not None:
            return native
        scheme = "auto"

    if kind in Q4_TYPES and scheme in ("auto", "int4"):  # exact: w = d·q + m = d·(q − 8) + (m + 8d)
        codes, d, m = (None if a is None else torch.from_numpy(a) for a in g.load_q4(src))
        zeros = 8 * d + m if m is not None else torch.zeros_like(d)
        return Int4Linear.from_codes(cols(rows(codes)), cols(rows(d), 32), cols(rows(zeros), 32), 32, bias,
                                     compute_dtype)
    if scheme == "auto":
        if kind != GGMLQuantizationType.Q8_0:
            return None
        scheme = "int8"
    w = cols(rows(torch.from_numpy(g.load(src))))
    if scheme == "int8":
        return Int8Linear.from_float(w, bias, compute_dtype)
    return quantize_weight(w, "int4", bias, group_size, compute_dtype)


#: projections that fusion (attnkit.nn.fused) concatenates: loaded in GGUF's layout, viewing the file, so that
#: each is repacked once, into the fused layer (see GGUFBlockLinear.cat_out)
_FUSED = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|ffn_gate|ffn_up)\.weight")


def _materialize_quantized(model: Llama, shapes: dict[str, torch.Size], plan: Plan, g: GGUFFile, cfg: LlamaConfig,
                           dtype: torch.dtype, scheme: str, group_size: int, compute_dtype: torch.dtype,
                           tp: TensorParallel | None = None) -> Llama:
    from ..quant.quantize import check_quantizable

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if scheme not in ("auto", "gguf"):  # bad group sizes before anything is read
        for name in linears:
            check_quantizable(name, shapes[f"{name}.weight"][1], scheme, group_size)
    head_src = "token_embd.weight" if cfg.tie_embeddings else plan["lm_head.weight"][0]

    def scheme_of(src: str) -> str:  # the head is never requantized to int4 (see attnkit.quant.quantize_model)
        return "int8" if src == head_src and scheme == "int4" and g.tensors[_base(src)].ggml_type not in Q4_TYPES else scheme

    quantized: dict[str, nn.Module] = {}
    for name in linears:
        src = plan[f"{name}.weight"][0]
        bias = plan[f"{name}.bias"][1]() if f"{name}.bias" in plan else None
        split = None if tp is None else tp.spec(f"{name}.weight", cfg)
        if MOE_LINEAR.fullmatch(name):  # a router or one expert's slice of the stacked expert tensors
            q = moe_linear(g, name, src, scheme, group_size, compute_dtype, split)
        else:
            q = quantized_linear(g, cfg, src, scheme_of(src), group_size, bias, compute_dtype, split)
        if q is None:
            continue
        if (q.out_features, q.in_features) != tuple(shapes[f"{name}.weight"]):
            raise ModelLoadError(g.path, f"shape mismatch: checkpoint gives {(q.out_features, q.in_features)} for "
                                         f"{name}.weight, the config implies {tuple(shapes[f'{name}.weight'])}", tensor=src)
        quantized[name] = q
    head = None
    table_split = None if tp is None else tp.spec("tok_embeddings.weight", cfg)
    if cfg.tie_embeddings:
        head = quantized_linear(g, cfg, head_src, scheme_of(head_src), group_size, None, compute_dtype, table_split)
    replaced = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    embedding = None
    if scheme == "gguf":
        from ..quant.native import GGUFBlockEmbedding

        warn_dequantized(g, {_base(src) for src, _ in plan.values()})
        if tp is not None and tp.world > 1:  # every rank looks tokens up in the whole table, viewed in the file's
            # mapping (pages read as rows are touched): the embedding needs no all-reduce (attnkit.parallel.tensor)
            table = native_linear(g, "token_embd.weight", interleaved=False)
            embedding = GGUFBlockEmbedding(table) if table is not None else None
        elif cfg.tie_embeddings and head is not None and hasattr(head, "blocks"):
            embedding = GGUFBlockEmbedding(head)  # rows decoded from the head's blocks: no float copy of the table
        elif not cfg.tie_embeddings:  # the table's own blocks, rows decoded as looked up (kept in GGUF's row layout)
            table = native_linear(g, "token_embd.weight", interleaved=False,
                                  rows=None if table_split is None else table_split.of)
            embedding = GGUFBlockEmbedding(table) if table is not None else None
        if embedding is not None:
            replaced.add("tok_embeddings.weight")
    state = {}
    for ours, (src, load) in plan.items():
        if ours in replaced:
            continue
        t = load()
        if t.shape != shapes[ours]:
            raise ModelLoadError(g.path, f"shape mismatch: checkpoint gives {tuple(t.shape)} for {ours}, the config "
                                         f"implies {tuple(shapes[ours])}", tensor=src)
        state[ours] = t.to(dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    for name, q in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    if "lm_head" in quantized:
        head, model.lm_head = model.lm_head, None
    model.output_head = head
    if hasattr(head, "dense_for_prompts"):  # the head sees only the sampled rows: always the integer kernel
        head.dense_for_prompts = False
    if embedding is not None:
        model.tok_embeddings = embedding
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a bug in the plan, never a bad file
        raise ModelLoadError(g.path, f"{left[0]} was not loaded ({len(left)} tensors left unloaded)")
    return model.eval()
