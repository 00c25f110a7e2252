"""Fine-tuned models back to llama.cpp: a merged GGUF file, or the LoRA adapter as llama.cpp's LoRA GGUF.

- :func:`export_merged`: base + adapter (HF PEFT format, :mod:`attnkit.peft`) merged into one GGUF model file.
  The base is a GGUF file or a Hugging Face directory. ``type="same"`` keeps every tensor's type (a GGUF
  base: its tensor types, the tensors the adapter leaves alone copied byte for byte, the ones it changes
  dequantized, merged and quantized again to their own type; an HF base: its float dtype, 1-D tensors F32
  as convert_hf_to_gguf.py writes them); a preset (``Q4_K_M``, ``Q8_0``, ``F16`` …) picks types as
  llama-quantize does (:func:`attnkit.quant.gguf_quantize.tensor_type`). A GGUF base's metadata (hparams,
  tokenizer, chat template) is copied key by key; an HF base's is written as convert_hf_to_gguf.py writes
  it for the architectures of :data:`HF_ARCHS` (llama, mistral as llama, qwen2, qwen3; byte-level BPE
  tokenizer.json). Note: re-quantizing a changed tensor to a 4-bit type rounds away most of a small LoRA delta
  (SmolLM2-135M Q4_1 "same": perplexity 6.95 → 6.83, vs 6.11 merged to F16 / Q8_0; benchmarks/export_gguf.py):
  pick Q8_0/F16 for such a fine-tune, or ship the LoRA GGUF. LoRA (Hu et al. 2021) and IA³ (Liu et al. 2022) adapters merge; the others are refused.
- :func:`export_lora`: a LoRA adapter in llama.cpp's LoRA GGUF (what convert_lora_to_gguf.py writes and
  ``llama-cli/llama-server --lora`` loads: ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha``, tensors ``<base tensor>.lora_a`` (r, in) and ``.lora_b`` (out, r) in PyTorch
  order, B's rows permuted like the base's Q/K rows for llama). llama.cpp scales each pair by alpha / r
  with r = lora_b's column count and one alpha per file; where attnkit's scaling differs (rsLoRA's α/√r,
  rank_pattern, alpha_pattern) the ratio is folded into lora_b, so W + (alpha/r)·B·A is attnkit's merge
  exactly. DoRA merges into the GGUF model file (its magnitude vector has no place in llama.cpp's LoRA file, which
  refuses it); the other methods are refused.
- :func:`read_lora_gguf`: such a file back as (LoraConfig, tensors) for :func:`attnkit.peft.save_load.fill_adapter`.

Every file is written to ``OUT.part`` and renamed at the end: a failure leaves no half-written file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .gguf_quantize import PRESETS, QUANT_TYPES, check_preset, copy_metadata, quantize_rows, read_metadata, tensor_type

_FLOAT_TYPES = ("F32", "F16", "BF16")
_FALLBACK_TYPE = "Q8_0"  # a changed tensor whose own type attnkit cannot write (Q2_K, Q3_K, IQ…)
#: config.json model_type → (GGUF architecture, Q/K rows permuted as llama.cpp's llama writer does)
HF_ARCHS: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                         "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
#: convert_hf_to_gguf.py's pre-tokenizer hashes (get_vocab_base_pre) for the pre-tokenizers attnkit runs
_PRE_HASHES = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
}
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
           '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


class ExportError(ValueError):
    """Input that cannot be exported: the message names the file, tensor or setting at fault."""


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py, LlamaModel): HF's half-split RoPE rows → adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the base model ---------------------------------------------------------------------------------------------

@dataclass
class _Base:
    """A base model seen as GGUF tensors: names in file order, PyTorch shapes, types, float32 loaders."""

    path: Path
    cfg: Any  # LlamaConfig
    arch: str
    shapes: dict[str, tuple[int, ...]]
    types: dict[str, str]
    load: Callable[[str], np.ndarray]  # GGUF name → float32 in GGUF layout
    raw: Callable[[str], np.ndarray] | None  # GGUF name → its blocks as stored (a GGUF base)
    permute: bool  # Q/K rows permuted (llama)
    write_meta: Callable[[Any, str], None]  # (GGUFWriter, file type preset or "same") → metadata written
    file_type: int | None = None  # general.file_type of a GGUF base
    ours: dict[str, str] = field(default_factory=dict)  # our parameter name → GGUF name


def _gguf_rules(cfg: Any) -> list[tuple[str, str]]:
    from ..loading.gguf import _rules

    return _rules(cfg)


def gguf_name(cfg: Any, ours: str, have: Callable[[str], bool] | None = None) -> str | None:
    """The GGUF tensor (``blk.0.attn_q.weight``, or a fused tensor's part ``blk.0.attn_qkv.weight[q]``) of our
    parameter ``ours`` (``layers.0.self_attn.q_proj.weight``); a part only where ``have`` says the fused one exists."""
    from ..loading.gguf import _PART, _base

    srcs = [re.fullmatch(p, ours).expand(t) for p, t in _gguf_rules(cfg) if re.fullmatch(p, ours)]
    srcs = [s for s in srcs if not _PART.fullmatch(s) or (have is not None and have(_base(s)))]
    return srcs[0] if srcs else None


def _gguf_base(path: Path) -> _Base:
    from ..loading.gguf import gguf_config
    from ..loading.gguf_file import GGUFFile

    g = GGUFFile(path)
    cfg = gguf_config(g)
    meta = read_metadata(path)
    arch = str(meta["general.architecture"][0])
    from ..models import registry

    permute = registry.by_name(cfg.extra["family"]).permute_qk

    def write_meta(w: Any, preset: str) -> None:
        copy_metadata(w, meta, meta.get("general.file_type", (None,))[0] if preset == "same" else PRESETS[preset][0])

    return _Base(path, cfg, arch, {n: t.shape for n, t in g.tensors.items()},
                 {n: t.ggml_type.name for n, t in g.tensors.items()}, g.load, g.raw_blocks, permute, write_meta)


def _hf_base(directory: Path) -> _Base:
    from ..loading.common import expected_shapes
    from ..loading.hf import SafetensorsSource, make_plan, model_config, name_rules, read_json
    from ..models.llama import LlamaConfig

    config = read_json(directory / "config.json")
    mt = config.get("model_type")
    if mt not in HF_ARCHS:
        raise ExportError(f"{directory}: model_type {mt!r} cannot be written as GGUF by attnkit (supported: "
                          f"{', '.join(HF_ARCHS)}; other families: llama.cpp's convert_hf_to_gguf.py)")
    cfg = model_config(config, directory / "config.json")
    assert isinstance(cfg, LlamaConfig)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") not in ("linear", "llama3"):
        raise ExportError(f"{directory}: RoPE scaling {cfg.rope_scaling.get('rope_type')!r} is not written "
                          "(supported: none, linear, llama3)")
    arch, permute = HF_ARCHS[mt]
    source = SafetensorsSource(directory)
    model_cls, rules, _, prefixes = name_rules(cfg)
    _, shapes = expected_shapes(model_cls, cfg)
    names = set(source.names())
    embed = make_plan({"tok_embeddings.weight": torch.Size()}, rules, "", source.load)["tok_embeddings.weight"][0]
    prefix = next((p for p in prefixes if p + embed in names), "")
    plan = make_plan(shapes, rules, prefix, source.load)
    missing = [src for src, _ in plan.values() if src not in names]
    if missing:
        raise ExportError(f"{directory}: tensor {missing[0]} is missing from the checkpoint")
    ours, gshapes, types, loaders = {}, {}, {}, {}
    for name, shape in shapes.items():
        g = gguf_name(cfg, name)
        if g is None:
            raise ExportError(f"{directory}: no GGUF name for {name} ({mt})")
        ours[name], gshapes[g] = g, tuple(shape)
        src = plan[name][0]
        dt = str(source._handles[source.file_of[src].name].get_slice(src).get_dtype())
        types[g] = {"F16": "F16", "BF16": "BF16"}.get(dt, "F32") if len(shape) > 1 else "F32"
        heads = (cfg.n_heads if g.endswith("attn_q.weight") else cfg.n_kv_heads if g.endswith("attn_k.weight")
                 else None) if permute else None

        def load(load_ours: Callable[[], torch.Tensor] = plan[name][1], heads: int | None = heads) -> np.ndarray:
            x = load_ours().float().numpy()
            return permute_qk(x, heads) if heads else x

        loaders[g] = load
    factors = None
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        factors = _llama3_factors(cfg)
        gshapes["rope_freqs.weight"], types["rope_freqs.weight"] = factors.shape, "F32"
        loaders["rope_freqs.weight"] = lambda: factors
    return _Base(directory, cfg, arch, gshapes, types, lambda n: loaders[n](), None, permute,
                 lambda w, preset: _hf_metadata(w, directory, config, cfg, arch, preset, types), ours=ours)


def _llama3_factors(cfg: Any) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for Llama 3's RoPE scaling (LlamaModel.generate_extra_tensors)."""
    sc, dim = cfg.rope_scaling, cfg.hd
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = sc.get("factor", 8.0), sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _hf_metadata(w: Any, directory: Path, config: dict, cfg: Any, arch: str, preset: str, types: dict[str, str]) -> None:
    """The metadata convert_hf_to_gguf.py writes for a llama-family model with a byte-level BPE tokenizer."""
    import gguf

    w.add_string("general.type", "model")
    w.add_string("general.name", directory.name)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.context_length", int(cfg.max_seq_len))
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.d_ff)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_theta))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.norm_eps))
    if cfg.hd != cfg.d_model // cfg.n_heads:
        w.add_uint32(f"{arch}.attention.key_length", cfg.hd)
        w.add_uint32(f"{arch}.attention.value_length", cfg.hd)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", float(cfg.rope_scaling["factor"]))
    if arch == "llama":
        w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.hd)
    if preset == "same":
        kinds = set(types.values())
        ft = 32 if "BF16" in kinds else 1 if "F16" in kinds else 0  # llama_ftype: MOSTLY_BF16, MOSTLY_F16, ALL_F32
    else:
        ft = PRESETS[preset][0]
    w.add_uint32("general.file_type", ft)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    _hf_tokenizer(w, directory, cfg.vocab_size)


def _hf_tokenizer(w: Any, directory: Path, vocab_size: int) -> None:
    """convert_hf_to_gguf.py's ``_set_vocab_gpt2``: tokens (added ones CONTROL if special, else USER_DEFINED;
    holes ``[PAD{i}]`` UNUSED), the pre-tokenizer by the hash of the tokenization of its check text, merges,
    special token ids, add_bos and the chat template (gguf's SpecialVocab)."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer

    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"{directory}: no tokenizer.json (SentencePiece tokenizer.model vocabularies are not "
                          "written; use llama.cpp's convert_hf_to_gguf.py)")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{file}: only byte-level BPE tokenizers (GPT-2 style, llama.cpp's 'gpt2' vocabulary) are "
                          f"written; this one is {model.get('type')!r}{' with byte fallback' if model.get('byte_fallback') else ''}")
    tk = HFTokenizer.from_file(str(file))
    vocab = tk.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"{file}: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        a = added.get(i)
        toktypes.append(gguf.TokenType.NORMAL if a is None else
                        gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tk, spec, file))
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    bos = special.special_token_ids.get("bos")
    if "bos" not in special.add_special_token and bos is not None:  # what the tokenizer itself does
        special.add_special_token["bos"] = tk.encode("a").ids[:1] == [bos]
    special.add_to_gguf(w, quiet=True)


def _pre_tokenizer(tk: Any, spec: dict, file: Path) -> str:
    """tokenizer.ggml.pre: convert_hf_to_gguf.py's hash of the check text's token ids, else the pre-tokenizer whose
    llama.cpp regexes the file's Split pre-tokenizers are (attnkit's own tokenizer.json files)."""
    from ..text.tokenizer import PRE_TOKENIZERS

    h = hashlib.sha256(str(tk.encode(_CHKTXT).ids).encode()).hexdigest()
    if h in _PRE_HASHES:
        return _PRE_HASHES[h]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, (known, _) in PRE_TOKENIZERS.items():
        if regexes == known:
            return name
    raise ExportError(f"{file}: the BPE pre-tokenizer is not one attnkit knows (convert_hf_to_gguf.py hash {h}; "
                      f"known: {', '.join(sorted(set(_PRE_HASHES.values())))})")


def open_base(path: str | Path) -> _Base:
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return _gguf_base(path)
        raise ExportError(f"{path}: not a GGUF file")
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_base(path)
    raise ExportError(f"{path}: no such GGUF file or Hugging Face directory with config.json")


# -- the adapter ------------------------------------------------------------------------------------------------

@dataclass
class _Part:
    """One adapted module's change to a GGUF tensor (rows: its part of a fused tensor, else all)."""

    module: str
    rows: slice | None
    A: np.ndarray | None = None  # LoRA (r, in)
    B: np.ndarray | None = None  # LoRA (out, r), rows in the GGUF layout
    scale: float = 1.0
    l: np.ndarray | None = None  # IA³ vector, rows in the GGUF layout
    feedforward: bool = False
    magnitude: np.ndarray | None = None  # DoRA's m (out,), rows in the GGUF layout


def _meta_model(base: _Base) -> torch.nn.Module:
    from ..loading.common import expected_shapes
    from ..loading.hf import name_rules

    model_cls = name_rules(base.cfg)[0]
    return expected_shapes(model_cls, base.cfg)[0]


def _tensor_of(base: _Base, ours: str) -> tuple[str, slice | None]:
    """(GGUF tensor, rows) of our parameter ``ours``."""
    from ..loading.gguf import _PART

    name = base.ours.get(ours) or gguf_name(base.cfg, ours, lambda n: n in base.shapes)
    if name is None:
        raise ExportError(f"{ours}: no GGUF tensor corresponds to it")
    m = _PART.fullmatch(name)
    if m is None:
        return name, None
    fused, part = m.groups()
    cfg = base.cfg
    q, kv, ff = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd, cfg.d_ff
    start, stop = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, ff), "up": (ff, 2 * ff)}[part]
    return fused, slice(start, stop)


def read_parts(base: _Base, adapter: str | Path, lora_only: bool = False) -> dict[str, list[_Part]]:
    """The adapter's changes by GGUF tensor name, checked against the base's shapes (before anything is written)."""
    from ..peft.lora import LoraConfig
    from ..peft.ia3 import IA3Config
    from ..peft.save_load import AdapterLoadError, read_adapter
    from ..peft.config import pattern_value

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise ExportError(f"{adapter}: no such adapter directory")
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter / 'adapter_config.json'}: missing (not an adapter directory in HF PEFT format)")
    try:
        raw = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raw = {}  # read_adapter names the fault
    if raw.get("use_dora") and lora_only:
        raise ExportError(f"{adapter}: a DoRA adapter (use_dora=true) cannot be a llama.cpp LoRA GGUF: llama.cpp's "
                          "LoRA applies W + s·B·A only; export the merged model instead (attnkit export --gguf)")
    kind = raw.get("peft_type", "?")
    if lora_only and kind != "LORA":
        raise ExportError(f"{adapter}: a {kind} adapter cannot be written as a llama.cpp LoRA GGUF (LoRA only)")
    try:
        config, tensors = read_adapter(adapter, _meta_model(base), dora=not lora_only)
    except AdapterLoadError as e:
        raise ExportError(str(e)) from None
    if not isinstance(config, (LoraConfig, IA3Config)):
        raise ExportError(f"{adapter}: a {config.peft_type} adapter has no weights to merge "
                          "(LoRA and IA3 merge into a GGUF file)")
    out: dict[str, list[_Part]] = {}
    for module, state in sorted(tensors.items()):
        name, rows = _tensor_of(base, module + ".weight")
        shape = base.shapes[name]
        if len(shape) != 2:
            raise ExportError(f"{adapter}: {module} maps to {name} of shape {shape}; only 2-D weights are exported")
        out_rows = shape[0] if rows is None else rows.stop - rows.start
        heads = None
        if base.permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = base.cfg.n_heads if name.endswith("attn_q.weight") else base.cfg.n_kv_heads
        if isinstance(config, LoraConfig):
            A = state["lora_A.weight"].float().numpy()
            B = state["lora_B.weight"].float().numpy()
            if A.shape[1] != shape[1] or B.shape[0] != out_rows or A.shape[0] != B.shape[1]:
                raise ExportError(f"{adapter}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                  f"but the base's {name} is {shape} (in={shape[1]}, out={out_rows}): an adapter "
                                  "trained for another model?")
            r = A.shape[0]
            alpha = float(pattern_value(module, config.alpha_pattern, config.lora_alpha))
            scale = alpha / (math.sqrt(r) if config.use_rslora else r)
            m = state.get("lora_magnitude_vector")
            if m is not None:
                m = m.float().numpy().reshape(-1)
                m = permute_qk(m, heads) if heads else m
            out.setdefault(name, []).append(_Part(module, rows, A, permute_qk(B, heads) if heads else B, scale,
                                                  magnitude=m))
        else:
            if lora_only:  # pragma: no cover - refused above
                raise ExportError(f"{adapter}: not a LoRA adapter")
            l = state["ia3_l"].float().numpy()
            ff = l.shape[0] == 1
            if (ff and l.shape[1] != shape[1]) or (not ff and l.shape[0] != out_rows):
                raise ExportError(f"{adapter}: {module}'s ia3_l {tuple(l.shape)} does not fit the base's {name} {shape}")
            l = permute_qk(l, heads) if heads and not ff else l
            out.setdefault(name, []).append(_Part(module, rows, l=l, feedforward=ff))
            bias = name.removesuffix(".weight") + ".bias"
            if not ff and bias in base.shapes:  # y = l ⊙ (Wx + b): the bias too
                out.setdefault(bias, []).append(_Part(module, rows, l=l[:, 0]))
    return out


def _merge(w: np.ndarray, parts: list[_Part]) -> np.ndarray:
    """W + s·B·A (LoRA) or W·l (IA³) for each part, on the part's rows; w float32 (out, in) in the GGUF layout."""
    w = np.array(w, dtype=np.float32, copy=True)
    for p in parts:
        view = w if p.rows is None else w[p.rows]
        if p.A is not None:
            view += np.float32(p.scale) * (p.B.astype(np.float32) @ p.A.astype(np.float32))
            if p.magnitude is not None:  # DoRA: m · (W + ΔW) / ‖W + ΔW‖ per output row (Liu et al. 2024, eq. 5)
                view *= (p.magnitude.astype(np.float32) / np.linalg.norm(view, axis=1))[:, None]
        elif p.l is not None:
            view *= p.l.astype(np.float32)
    return w


# -- writing ----------------------------------------------------------------------------------------------------

def _write(out: Path, arch: str, meta: Callable[[Any], None], tensors: list[tuple[str, tuple[int, ...], str]],
           data: Callable[[str, str], np.ndarray], progress: bool = False) -> None:
    """A GGUF file: metadata, then each tensor's blocks as ``data(name, type)`` gives them; OUT.part renamed at the end."""
    import gguf
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(tmp, arch)
    bar = None
    try:
        meta(w)
        for name, shape, ty in tensors:
            qt = GGMLQuantizationType[ty]
            block, size = GGML_QUANT_SIZES[qt]
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
            w.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tensors), desc=f"write {out.name}", unit="tensor")
        for name, shape, ty in tensors:
            blocks = data(name, ty)
            w.write_tensor_data(np.ascontiguousarray(blocks).view(np.uint8).reshape(-1))
            if bar is not None:
                bar.update(1)
        w.close()
        tmp.replace(out)
    finally:
        if bar is not None:
            bar.close()
        w.close()
        if tmp.exists():
            tmp.unlink()


def _check_out(out: str | Path, *inputs: str | Path | None) -> Path:
    out = Path(out)
    for p in inputs:
        if p is not None and Path(p).exists() and Path(p).resolve() == out.resolve():
            raise ExportError(f"{out}: the output file must differ from the input files")
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; give a file name")
    return out


def export_merged(base_path: str | Path, out: str | Path, adapter: str | Path | None = None, type: str = "same",
                  threads: int | None = None, progress: bool = False) -> dict[str, str]:
    """Write ``base_path`` (GGUF file or HF directory) with ``adapter`` merged to ``out`` as GGUF; returns name → type.

    ``type``: "same" (each tensor keeps its type; see the module docstring) or a llama-quantize preset
    (:data:`attnkit.quant.gguf_quantize.PRESETS`). A changed tensor is merged in float32 from the base's
    dequantized values; a GGUF base's tensors that keep their type and are not changed are copied as stored.
    """
    preset = "same" if type.lower() == "same" else check_preset(type)
    out = _check_out(out, base_path, adapter)
    base = open_base(base_path)
    parts = read_parts(base, adapter) if adapter is not None else {}
    n_layers = base.cfg.n_layers
    tied = "output.weight" not in base.shapes
    if tied and any(m.startswith("lm_head") for ps in parts.values() for m in (p.module for p in ps)):
        raise ExportError("the adapter changes lm_head, which this model ties to the token embeddings")
    types: dict[str, str] = {}
    for name, shape in base.shapes.items():
        src = base.types[name]
        if preset == "same":
            ty = src
        else:
            ty = tensor_type(preset, name, n_layers, shape, tied, src)
            if len(shape) < 2 and src not in _FLOAT_TYPES:
                ty = "F32"
        if (name in parts or ty != src or base.raw is None) and ty not in QUANT_TYPES + _FLOAT_TYPES:
            ty = _FALLBACK_TYPE if len(shape) > 1 else "F32"
        types[name] = ty

    def data(name: str, ty: str) -> np.ndarray:
        if base.raw is not None and name not in parts and ty == base.types[name]:
            return base.raw(name)  # kept as it is: the bytes themselves
        x = base.load(name)
        if name in parts:
            x = _merge(x, parts[name])
        return quantize_rows(x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x, ty, threads)

    tensors = [(n, tuple(s), types[n]) for n, s in base.shapes.items()]
    _write(out, base.arch, lambda w: base.write_meta(w, preset), tensors, data, progress)
    return types


def export_lora(adapter: str | Path, base_path: str | Path, out: str | Path, dtype: str = "F32") -> dict[str, Any]:
    """Write the LoRA ``adapter`` of ``base_path`` as llama.cpp's LoRA GGUF ``out``; returns alpha and the tensors.

    A fused base tensor (Phi-3's attn_qkv) adapted in several parts gets one pair: A stacked, B block-diagonal.
    """
    dtype = dtype.upper()
    if dtype not in _FLOAT_TYPES:
        raise ExportError(f"LoRA tensor type {dtype!r} is not supported (F32, F16, BF16)")
    out = _check_out(out, base_path, adapter)
    base = open_base(base_path)
    parts = read_parts(base, adapter, lora_only=True)
    if not parts:
        raise ExportError(f"{adapter}: the adapter changes no tensor of the base")
    pairs: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}  # GGUF name → (A, B, scaling)
    for name, ps in parts.items():
        if len(ps) == 1 and ps[0].rows is None:
            pairs[name] = (ps[0].A, ps[0].B, ps[0].scale)
            continue
        rows, r = base.shapes[name][0], sum(p.A.shape[0] for p in ps)
        A = np.concatenate([p.A for p in ps])
        B = np.zeros((rows, r), dtype=np.float32)
        col = 0
        for p in ps:
            k = p.A.shape[0]
            B[p.rows if p.rows is not None else slice(None), col:col + k] = p.B * p.scale
            col += k
        pairs[name] = (A, B, 1.0)
    # llama.cpp: scale = alpha / r (alpha 0 would mean scale 1); the most common s·r, the others folded into B
    alphas = [float(np.float32(s * A.shape[0])) for A, _, s in pairs.values()]
    alpha = max(alphas, key=alphas.count) or 1.0
    tensors: dict[str, np.ndarray] = {}
    for name, (A, B, s) in pairs.items():
        r = A.shape[0]
        fold = s / (alpha / r)
        tensors[name + ".lora_a"] = A.astype(np.float32)
        tensors[name + ".lora_b"] = (B if math.isclose(fold, 1.0, rel_tol=1e-7) else B * np.float32(fold)).astype(np.float32)

    def meta(w: Any) -> None:
        import gguf

        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        w.add_string("general.name", Path(adapter).name)
        w.add_uint32("general.file_type", {"F32": 0, "F16": 1, "BF16": 32}[dtype])
        w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)

    order = sorted(tensors, key=_tensor_order)
    _write(out, base.arch, meta, [(n, tensors[n].shape, dtype) for n in order],
           lambda n, ty: quantize_rows(tensors[n], ty))
    return {"alpha": float(alpha), "tensors": {n: tensors[n].shape for n in order}}


def _tensor_order(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


# -- reading a LoRA GGUF back -----------------------------------------------------------------------------------

def read_lora_gguf(path: str | Path, model: torch.nn.Module) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """(LoraConfig, ``{module: {"lora_A.weight", "lora_B.weight"}}``) of a llama.cpp LoRA GGUF for ``model`` (an
    attnkit Llama-family model), as :func:`attnkit.peft.save_load.read_adapter` returns them: lora_b's rows
    un-permuted for llama, llama.cpp's scale alpha/r kept (every module gets lora_alpha = alpha, its own r)."""
    from ..loading.gguf import unpermute_qk
    from ..loading.gguf_file import GGUFFile
    from ..models import registry
    from ..peft.lora import LoraConfig

    g = GGUFFile(path)
    m = g.metadata
    if m.get("general.type") != "adapter" or m.get("adapter.type") != "lora":
        raise ExportError(f"{path}: not a llama.cpp LoRA GGUF (general.type={m.get('general.type')!r}, "
                          f"adapter.type={m.get('adapter.type')!r})")
    cfg = model.cfg
    family = registry.by_name(cfg.extra.get("family", "llama"))
    if m.get("general.architecture") not in family.gguf_archs and not (family.permute_qk and m.get("general.architecture") == "llama"):
        raise ExportError(f"{path}: adapter for {m.get('general.architecture')!r}, the model is {family.name}")
    alpha = float(m.get("adapter.lora.alpha", 0.0))
    names = {}
    for n, p in model.named_parameters():
        if n.endswith(".weight") and p.dim() == 2:
            gname = gguf_name(cfg, n)
            if gname is not None:
                names[gname] = n.removesuffix(".weight")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for key in g.tensors:
        if not key.endswith(".lora_a"):
            continue
        base = key.removesuffix(".lora_a")
        if base not in names:
            raise ExportError(f"{path}: {base} is not a tensor of this model attnkit can adapt")
        if base + ".lora_b" not in g.tensors:
            raise ExportError(f"{path}: {base}.lora_b is missing")
        A, B = g.load(key), g.load(base + ".lora_b")
        heads = None
        if family.permute_qk and base.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.n_heads if base.endswith("attn_q.weight") else cfg.n_kv_heads
        Bt = torch.from_numpy(B)
        tensors[names[base]] = {"lora_A.weight": torch.from_numpy(A),
                                "lora_B.weight": unpermute_qk(Bt, heads) if heads else Bt}
        ranks[names[base]] = A.shape[0]
    if not tensors:
        raise ExportError(f"{path}: no .lora_a/.lora_b tensor pairs")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    # alpha 0: llama.cpp applies scale 1, i.e. each module's α equals its own r
    config = LoraConfig(r=r, lora_alpha=alpha if alpha else float(r), target_modules=sorted(tensors),
                        rank_pattern={k: v for k, v in ranks.items() if v != r}, inference_mode=True,
                        alpha_pattern={} if alpha else {k: float(v) for k, v in ranks.items() if v != r})
    return config, tensors


def load_lora_gguf(model: torch.nn.Module, path: str | Path, adapter_name: str = "default") -> Any:
    """``model`` wrapped in a :class:`~attnkit.peft.PeftModel` with the LoRA GGUF ``path`` as ``adapter_name``."""
    from ..peft import PeftModel
    from ..peft.save_load import fill_adapter

    config, tensors = read_lora_gguf(path, model)
    peft = PeftModel(model, config, adapter_name)
    fill_adapter(peft, adapter_name, tensors, path)
    return peft
