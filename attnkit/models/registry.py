"""The decoder families attnkit runs, registered in one place (as vLLM's model registry).

Every decoder family is the one pre-norm decoder of :mod:`attnkit.models.llama` with the options of the
shared blocks set by its config (q/k norm, sandwich norms, soft-capping, sliding windows, mixture of
experts, …). A family module (``attnkit/models/<family>.py``) holds what is its own: how a checkpoint's
config.json and a GGUF file's metadata set those options, and the names its tensors have in each — and
registers a :class:`Family` here. The loaders ask :func:`by_hf_type` and :func:`by_gguf_arch`;
``attnkit models`` prints :func:`support_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import re

    import torch

    from .llama import LlamaConfig

#: (our-name regex, checkpoint-name template with {p} = prefix, transform of the loaded tensor or None)
HFRule = tuple[str, str, "Callable[[torch.Tensor, re.Match], torch.Tensor] | None"]
#: (our-name regex, GGUF-name template)
GGUFRule = tuple[str, str]
#: metadata getter of a GGUF file: get(key without the "<arch>." prefix, default) → value
MetaGet = Callable[..., Any]


@dataclass(frozen=True)
class Family:
    """One decoder family: where its checkpoints differ from Llama's, and what of attnkit it has."""

    name: str
    hf_types: tuple[str, ...] = ()  # config.json "model_type" values
    gguf_archs: tuple[str, ...] = ()  # GGUF "general.architecture" values
    #: (the common Llama reading of config.json, config.json) → the family's config; raise ValueError if unsupported
    hf_config: Callable[[LlamaConfig, dict[str, Any]], LlamaConfig] | None = None
    #: (the common Llama reading of the metadata, get, tensor names → shapes) → the family's config
    gguf_config: Callable[[LlamaConfig, MetaGet, dict[str, Any]], LlamaConfig] | None = None
    hf_rules: tuple[HFRule, ...] = ()  # tried before the common Llama rules
    hf_ignore: tuple[str, ...] = ()
    gguf_rules: tuple[GGUFRule, ...] = ()  # tried before the common Llama rules
    gguf_ignore: tuple[str, ...] = ()
    permute_qk: bool = False  # llama.cpp permutes the Q/K rows of this architecture (its "llama" writer)
    #: what `attnkit models` lists: HF, GGUF, engine, C step, LoRA → "yes" / "no" / a note
    supports: dict[str, str] = field(default_factory=dict)
    example: str = ""  # a model of the family people run


_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    _FAMILIES.append(family)
    return family


def families() -> list[Family]:
    _load_all()
    return list(_FAMILIES)


def by_hf_type(model_type: str) -> Family | None:
    return next((f for f in families() if model_type in f.hf_types), None)


def by_gguf_arch(arch: str) -> Family | None:
    return next((f for f in families() if arch in f.gguf_archs), None)


def by_name(name: str) -> Family:
    fam = next((f for f in families() if f.name == name), None)
    if fam is None:
        raise KeyError(f"no decoder family {name!r} (known: {', '.join(f.name for f in families())})")
    return fam


def hf_types() -> tuple[str, ...]:
    return tuple(t for f in families() for t in f.hf_types)


def gguf_archs() -> tuple[str, ...]:
    return tuple(a for f in families() for a in f.gguf_archs)


COLUMNS = ("HF", "GGUF", "engine", "C step", "LoRA")


def support_table() -> list[dict[str, str]]:
    """One row per family: its name, checkpoint names, an example and what each part of attnkit does with it."""
    return [{"family": f.name, "model_type": ", ".join(f.hf_types) or "-", "gguf": ", ".join(f.gguf_archs) or "-",
             "example": f.example, **{c: f.supports.get(c, "no") for c in COLUMNS}} for f in families()]


_LOADED = False


def _load_all() -> None:
    """Import every family module once (each registers itself)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import importlib

        for mod in FAMILY_MODULES:
            importlib.import_module(f"{__package__}.{mod}")


#: the family modules, in the order `attnkit models` lists them
FAMILY_MODULES = ("llama", "qwen3", "gemma", "moe", "phi3")
