"""Adapters on disk in HF PEFT's format: adapter_config.json + adapter_model.safetensors.

Tensor keys are PEFT's: ``base_model.model.<HF module name>.<tensor>`` for LoRA (``lora_A.weight``,
``lora_B.weight``, and DoRA's ``lora_magnitude_vector``, PEFT's file name without ``.weight``) and IA³ (``ia3_l``), and the single ``prompt_embeddings`` for prompt, P- and prefix
tuning (the prompt encoder's *output*: a loaded prompt adapter is a plain table). Bottleneck adapters,
which PEFT does not have, use attnkit's module names under the same scheme.

GPT-2 checkpoints fuse q, k, v into one ``c_attn``. A PEFT LoRA on c_attn (A: (r, d), B: (3d, r)) becomes
three LoRAs sharing A, each with a third of B; attnkit's separate q/k/v LoRAs are saved as one c_attn
LoRA of rank Σr with A stacked and B block-diagonal — the same ΔW exactly, with α scaled to keep α/r.
DoRA's magnitude is per output row, so it splits and stacks by thirds (‖W_k‖ for a part not adapted).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import AdapterLayer, BottleneckConfig
from .config import PeftConfig, pattern_value
from .families import family_of, hf_name_table
from .ia3 import IA3Config
from .lora import LoraConfig, LoraLinear
from .tuner import dense_weight, tuner_layers



class AdapterModel(Protocol):
    """What saving and loading read and call of a model with adapters (:class:`attnkit.peft.PeftModel`): named
    here, so that this module does not import the model's (which imports this one)."""

    base_model: nn.Module
    peft_config: dict[str, PeftConfig]
    prompt_encoders: Any
    active_adapter: str | None

    def add_adapter(self, name: str, config: PeftConfig, tokenizer: Any = None) -> None: ...
    def set_adapter(self, name: str) -> None: ...
    def delete_adapter(self, name: str) -> None: ...
    def _check(self, name: str) -> Any: ...

CONFIG_FILE, WEIGHTS_FILE, ROOT = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


# -- saving -----------------------------------------------------------------------------------------
def save_adapter(peft: AdapterModel, directory: str | Path, name: str) -> Path:
    """Write adapter ``name`` of ``peft`` to ``directory`` (atomically: both files or neither)."""
    peft._check(name)
    config = peft.peft_config[name]
    if config.is_prompt_learning:
        tensors = {"prompt_embeddings": peft.prompt_encoders[name].prompt_embeddings()}
        cfg = config.to_dict()
    else:
        tensors, cfg = _layer_tensors(peft, name, config)
    cfg["inference_mode"] = True
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_w = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp_w)
    tmp_c = directory / (CONFIG_FILE + ".tmp")
    tmp_c.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_c, directory / CONFIG_FILE)
    return directory


def _layer_tensors(peft: AdapterModel, name: str, config: PeftConfig) -> tuple[dict[str, torch.Tensor], dict]:
    model = peft.base_model
    table = hf_name_table(model)
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, TunerLayerState]] = {}  # GPT-2's c_attn, Phi-3's qkv_proj / gate_up_proj → {part: state}
    ranks: dict[str, tuple[int, float]] = {}  # HF module → (r, α) for LoRA
    for ours, layer in tuner_layers(model):
        if name not in layer.adapter_names():
            continue
        state = {k: v.detach() for k, v in layer.adapter_state(name).items()}
        if isinstance(layer, AdapterLayer):
            tensors.update({f"{ROOT}{ours}.{k}": v for k, v in state.items()})
            continue
        hf, part = table[ours]
        if part is not None:
            fused.setdefault(hf, {})[part] = (layer, state)
            continue
        tensors.update({f"{ROOT}{hf}.{k}": v for k, v in state.items()})
        if isinstance(layer, LoraLinear):
            ranks[hf] = (state["lora_A.weight"].shape[0], _alpha(layer, name, config))
    for hf, parts in fused.items():
        sizes = part_sizes(model, table, hf)
        if isinstance(config, LoraConfig):
            A, B, r = _fuse_lora(parts, sizes)
            tensors[f"{ROOT}{hf}.lora_A.weight"], tensors[f"{ROOT}{hf}.lora_B.weight"] = A, B
            if config.use_dora:
                tensors[f"{ROOT}{hf}.lora_magnitude_vector"] = _fuse_magnitude(parts, hf, table, model)
            ranks[hf] = (r, _scaling_of(parts, name) * (math.sqrt(r) if config.use_rslora else r))
        else:  # IA³ on some parts: the fused module's vector, with ones for the parts not adapted
            tensors[f"{ROOT}{hf}.ia3_l"] = torch.cat([parts[j][1]["ia3_l"] if j in parts else torch.ones(n, 1)
                                                     for j, n in enumerate(sizes)])
    cfg = config.to_dict()
    adapted = sorted({k[len(ROOT):].rsplit(".lora_", 1)[0].removesuffix(".ia3_l").split(".adapter_")[0]
                      for k in tensors})
    if not isinstance(config, BottleneckConfig):
        all_hf = sorted({hf for hf, _ in table.values()})
        cfg["target_modules"] = _suffixes(adapted, all_hf)
    if isinstance(config, IA3Config):
        ff = [hf for hf in adapted if tensors[f"{ROOT}{hf}.ia3_l"].shape[0] == 1]
        cfg["feedforward_modules"] = _suffixes(ff, sorted({hf for hf, _ in table.values()}))
    if isinstance(config, LoraConfig):
        cfg["rank_pattern"] = {hf: r for hf, (r, _) in ranks.items() if r != config.r}
        cfg["alpha_pattern"] = {hf: a for hf, (_, a) in ranks.items() if not math.isclose(a, config.lora_alpha)}
        cfg["fan_in_fan_out"] = family_of(model).name == "gpt2"  # HF GPT-2's Conv1D layers
    return tensors, cfg


TunerLayerState = tuple  # (layer, {tensor name: tensor})


def _alpha(layer: LoraLinear, name: str, config: LoraConfig) -> float:
    r = layer.lora_A[name].weight.shape[0]
    return layer.scaling[name] * (math.sqrt(r) if config.use_rslora else r)


def _scaling_of(parts: dict[int, TunerLayerState], name: str) -> float:
    scalings = {parts[j][0].scaling[name] for j in parts}
    if len(scalings) != 1:
        raise ValueError("LoRAs of one fused HF module's parts (GPT-2's c_attn, Phi-3's qkv_proj / gate_up_proj) with "
                         "different α/r cannot be saved as one LoRA of it")
    return scalings.pop()


def part_sizes(model: nn.Module, table: dict[str, tuple[str, int | None]], hf: str) -> list[int]:
    """The output rows of each part of fused HF module ``hf`` (GPT-2's c_attn: three equal; Phi-3's qkv_proj: q, k,
    v; gate_up_proj: gate, up), from attnkit's modules of those parts."""
    ours = sorted((part, name) for name, (h, part) in table.items() if h == hf and part is not None)
    return [dense_weight(model.get_submodule(name)).shape[0] for _, name in ours]


def _fuse_lora(parts: dict[int, TunerLayerState], sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack A (Σr, d) and place each part's B (n_j, r_j) in its rows of the fused output, columns of its rank block:
    the fused module's update is exactly the parts' updates side by side."""
    As = [parts[j][1]["lora_A.weight"] for j in sorted(parts)]
    r = sum(a.shape[0] for a in As)
    B = torch.zeros(sum(sizes), r)
    col = 0
    for j in sorted(parts):
        b = parts[j][1]["lora_B.weight"]
        row = sum(sizes[:j])
        B[row:row + sizes[j], col:col + b.shape[1]] = b
        col += b.shape[1]
    return torch.cat(As), B, r


def _fuse_magnitude(parts: dict[int, TunerLayerState], hf: str, table: dict, model: nn.Module) -> torch.Tensor:
    """DoRA's m of a fused module (its rows): each part's m, or for a part not adapted its weight's row norms
    (m/‖W‖ = 1)."""
    ours = {part: o for o, (h, part) in table.items() if h == hf}
    return torch.cat([parts[j][1]["lora_magnitude_vector"] if j in parts
                      else LoraLinear.weight_norm(dense_weight(model.get_submodule(ours[j])).detach(), 0.0)
                      for j in range(len(ours))])


def _suffixes(chosen: list[str], every: list[str]) -> list[str]:
    """The shortest dotted suffixes naming exactly the ``chosen`` modules among ``every`` (PEFT's list rule)."""
    out = set()
    others = [e for e in every if e not in chosen]
    for c in chosen:
        parts = c.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if not any(o == s or o.endswith("." + s) for o in others):
                out.add(s)
                break
    return sorted(out)


# -- loading ------------------------------------------------------------------------------------------
class AdapterLoadError(ValueError):
    """An adapter directory that is missing, corrupt, or does not fit the model."""


def read_adapter(directory: str | Path, model: nn.Module, dora: bool = False) -> tuple[PeftConfig, dict]:
    """(config for attnkit, tensors) of an adapter directory. For LoRA / IA³ / bottleneck the tensors are
    ``{attnkit module name: {tensor name: tensor}}``; for prompt methods ``{"prompt_embeddings": t}``.
    A DoRA adapter (use_dora) is refused unless ``dora``: readers that apply W + s·B·A alone would drop its
    magnitude vector."""
    directory = Path(directory)
    cfg_file, w_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            hint = " (pickled adapter_model.bin files are not loaded)" if f == w_file else ""
            raise AdapterLoadError(f"{f}: missing{hint}")
    try:
        raw = json.loads(cfg_file.read_text())
        config = PeftConfig.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{cfg_file}: {e}") from None
    for flag in ("use_qalora", "lora_bias") if dora else ("use_dora", "use_qalora", "lora_bias"):
        if raw.get(flag):
            raise AdapterLoadError(f"{cfg_file}: {flag}=true is not supported")
    try:
        flat = load_file(str(w_file))
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"{w_file}: corrupt or truncated safetensors file ({e})") from None
    if config.is_prompt_learning:
        if set(flat) != {"prompt_embeddings"}:
            raise AdapterLoadError(f"{w_file}: expected only 'prompt_embeddings', found {sorted(flat)}")
        cfg = replace(config, prompt_tuning_init="RANDOM") if hasattr(config, "prompt_tuning_init") else config
        return cfg, {"prompt_embeddings": flat["prompt_embeddings"].float()}
    tensors, alphas = _to_ours(flat, model, w_file, config)
    return _config_for(config, tensors, alphas), tensors


_SUFFIXES = {"LORA": (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"), "IA3": (".ia3_l",), "BOTTLENECK": (".adapter_",)}


def _to_ours(flat: dict[str, torch.Tensor], model: nn.Module, file: Path, config: PeftConfig
             ) -> tuple[dict, dict[str, float]]:
    """Tensors by attnkit module name, and for LoRA each module's α (from the file's alpha_pattern)."""
    fam = family_of(model)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    if config.peft_type == "LORA":
        kind = "DoRA" if getattr(config, "use_dora", False) else "LoRA"
        for key, t in flat.items():
            if ".lora_embedding_" in key or (".lora_A." in key and t.dim() != 2):
                raise AdapterLoadError(f"{file}: tensor {key!r}: {kind} on an Embedding or convolution layer is not "
                                       "supported (attnkit adapts Linear layers only)")
    for key, t in flat.items():
        if not key.startswith(ROOT):
            raise AdapterLoadError(f"{file}: tensor {key!r} does not start with {ROOT!r}")
        rest = key[len(ROOT):]
        cut = next((rest.index(s) for s in _SUFFIXES[config.peft_type] if s in rest), None)
        if cut is None:
            raise AdapterLoadError(f"{file}: tensor {key!r} is not a {config.peft_type} tensor attnkit supports")
        tensor = rest[cut + 1:]
        tensor = "lora_magnitude_vector" if tensor.startswith("lora_magnitude_vector") else tensor  # ".weight" or not
        by_module.setdefault(rest[:cut], {})[tensor] = t.float()
    if config.peft_type == "BOTTLENECK":
        return by_module, {}
    candidates = [fam.hf_prefix, "", "bert."] if fam.name == "bert" else [fam.hf_prefix]
    for prefix in candidates:
        inverse: dict[str, list[tuple[str, int | None]]] = {}
        table = hf_name_table(model, prefix)
        for ours, (hf, part) in table.items():
            inverse.setdefault(hf, []).append((ours, part))
            if part is not None:  # a part under attnkit's own name (Phi-3's adapters before they took HF's fused ones)
                inverse.setdefault(prefix + ours, []).append((ours, None))
        if all(m in inverse for m in by_module):
            break
    else:
        missing = next(m for m in by_module if m not in inverse)
        raise AdapterLoadError(f"{file}: module {missing!r} does not exist in this {type(model).__name__} "
                               "(adapter trained for another architecture or size?)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for hf, state in by_module.items():
        for ours, part in inverse[hf]:
            out[ours] = state if part is None else _split_fused(state, part, part_sizes(model, table, hf))
            if isinstance(config, LoraConfig):
                alphas[ours] = float(pattern_value(hf, config.alpha_pattern, config.lora_alpha))
    return out, alphas


def _split_fused(state: dict[str, torch.Tensor], part: int, sizes: list[int]) -> dict[str, torch.Tensor]:
    """Part ``part`` of a tensor set on a fused HF module whose parts have ``sizes`` output rows (A is shared)."""
    lo = sum(sizes[:part])
    hi = lo + sizes[part]
    if "ia3_l" in state:
        return {"ia3_l": state["ia3_l"][lo:hi]}
    return {k: v if k == "lora_A.weight" else v[lo:hi] for k, v in state.items()}


def _config_for(config: PeftConfig, tensors: dict, alphas: dict[str, float]) -> PeftConfig:
    """The file's config aimed at exactly the modules its tensors adapt (in attnkit's names)."""
    names = sorted(tensors)
    if isinstance(config, LoraConfig):
        ranks = {n: tensors[n]["lora_A.weight"].shape[0] for n in names}
        return replace(config, target_modules=names, rank_pattern={n: r for n, r in ranks.items() if r != config.r},
                       alpha_pattern={n: a for n, a in alphas.items() if not math.isclose(a, config.lora_alpha)})
    if isinstance(config, IA3Config):
        ff = [n for n in names if tensors[n]["ia3_l"].shape[0] == 1]
        return replace(config, target_modules=names, feedforward_modules=ff)
    if isinstance(config, BottleneckConfig):
        subs = sorted({n.rsplit(".", 1)[1] for n in names})
        size = next(iter(tensors.values()))["adapter_down.weight"].shape[0]
        return replace(config, target_modules=subs, bottleneck_size=size)
    return config


def fill_adapter(peft: AdapterModel, name: str, tensors: dict, source: str | Path) -> None:
    """Copy the tensors read by :func:`read_adapter` into adapter ``name`` (already added)."""
    try:
        if peft.peft_config[name].is_prompt_learning:
            enc = peft.prompt_encoders[name]
            want = enc().shape
            got = tensors["prompt_embeddings"].shape
            if tuple(got) != tuple(want):
                raise ValueError(f"prompt_embeddings has shape {tuple(got)}, this model needs {tuple(want)}")
            enc.load_prompt_embeddings(tensors["prompt_embeddings"])
            return
        layers = dict(tuner_layers(peft.base_model))
        for module, state in tensors.items():
            layer = layers[module]
            while name not in layer.adapter_names():
                layer = layer.base_layer  # type: ignore[assignment]
            layer.load_adapter_state(name, state)
    except ValueError as e:
        peft.delete_adapter(name)
        raise AdapterLoadError(f"{source}: {e}") from None


def load_adapter(peft: AdapterModel, directory: str | Path, name: str, is_trainable: bool = False) -> None:
    """Add the adapter saved in ``directory`` to ``peft`` under ``name``."""
    config, tensors = read_adapter(directory, peft.base_model, dora=True)
    peft.add_adapter(name, replace(config, inference_mode=not is_trainable))
    fill_adapter(peft, name, tensors, directory)
    if peft.active_adapter is not None:
        peft.set_adapter(peft.active_adapter)
