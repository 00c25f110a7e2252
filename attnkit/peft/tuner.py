"""Injected adapter layers: a wrapper around a base module that holds several named adapters.

The wrapper replaces the base module in its parent (``parent.q_proj = LoraLinear(parent.q_proj)``)
and keeps it as ``base_layer``; each adapter's parameters live in ModuleDicts/ParameterDicts keyed by
the adapter's name. One adapter is active at a time; a disabled or foreign adapter leaves the base's
output untouched. Wrappers nest (a LoRA around an IA³ around the Linear), each ignoring the others' names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TunerLayer(nn.Module):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.disabled = False

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove every parameter container entry of adapter ``name``."""
        for child in self.children():
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and name in child:
                del child[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors with PEFT's key names (``lora_A.weight``, ``ia3_l``, ...)."""
        raise NotImplementedError

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state(name)
        if set(own) != set(state):
            raise ValueError(f"adapter {name!r}: expected tensors {sorted(own)}, got {sorted(state)}")
        with torch.no_grad():
            for k, t in state.items():
                if own[k].shape != t.shape:
                    raise ValueError(f"adapter {name!r}: {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
                own[k].copy_(t)

    def active(self) -> str | None:
        """The adapter that acts in this forward pass, or None."""
        if self.disabled or self.active_adapter not in self.adapter_names():
            return None
        return self.active_adapter


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a frozen quantized linear layer (QLoRA's base: GGUF blocks, attnkit's int8/int4)."""
    from ..quant.base import QuantLinear
    from ..quant.native import GGUFBlockLinear

    return isinstance(module, (nn.Linear, QuantLinear, GGUFBlockLinear))


def base_linear(module: nn.Module) -> nn.Module:
    """The linear layer (see :func:`is_linear`) under any number of wrappers."""
    while isinstance(module, TunerLayer):
        module = module.base_layer
    if not is_linear(module):
        raise ValueError(f"expected a linear layer under the adapters, found {type(module).__name__}")
    return module


def is_quantized(module: nn.Module) -> bool:
    """Whether the linear layer under the wrappers keeps its weight quantized (it cannot take a merge)."""
    return not isinstance(base_linear(module), nn.Linear)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of the linear layer under the wrappers: nn.Linear's own parameter, or a quantized
    layer's weight dequantized to a float32 copy."""
    lin = base_linear(module)
    if isinstance(lin, nn.Linear):
        return lin.weight
    n, k = lin.out_features, lin.in_features  # type: ignore[union-attr]
    return lin.dequantize_rows(0, n, torch.empty(n, k))  # type: ignore[operator]


def clean_name(name: str) -> str:
    """Module name without the wrappers' ``.base_layer`` segments: ``layers.0.self_attn.q_proj``."""
    return name.replace(".base_layer", "")


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, TunerLayer):
        module = module.base_layer
    return module


def inject(model: nn.Module, select: Callable[[str, nn.Module], bool], kind: type[TunerLayer],
           add: Callable[[TunerLayer, str], None]) -> list[str]:
    """Call ``add(layer, module_name)`` for every module that ``select(module_name, base_module)`` picks.

    A module whose wrapper chain already has a ``kind`` layer gets the adapter added there; otherwise
    its outermost wrapper (or the module itself) is wrapped in a new ``kind`` layer. Returns the names
    of the adapted modules.
    """
    chosen = [(n, m) for n, m in base_modules(model) if ".base_layer" not in n and select(n, innermost(m))]
    for name, module in chosen:
        layer = module
        while isinstance(layer, TunerLayer) and not isinstance(layer, kind):
            layer = layer.base_layer
        if not isinstance(layer, kind):
            parent_name, _, child = name.rpartition(".")
            layer = kind(module)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        add(layer, name)
    return [n for n, _ in chosen]


ALL_LINEAR = "all-linear"  # HF PEFT's shorthand: every linear layer but the output head
OUTPUT_HEADS = ("lm_head", "output_head", "head", "output", "classifier")


def linear_selector(targets, method: str) -> Callable[[str, nn.Module], bool]:
    """``inject``'s ``select`` for methods that adapt Linear layers: the modules ``targets`` match
    (see :func:`attnkit.peft.config.matches`); a matched module that is not a Linear is an error."""
    from .config import matches

    def select(module_name: str, module: nn.Module) -> bool:
        if targets in (ALL_LINEAR, [ALL_LINEAR]):
            return is_linear(module) and module_name.rpartition(".")[2] not in OUTPUT_HEADS
        if not matches(module_name, targets):
            return False
        if not is_linear(module):
            raise ValueError(f"{method} target {module_name} is a {type(module).__name__}, not a Linear layer")
        return True

    return select


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of the base model, wrappers included, adapters' own layers not."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, TunerLayer)]

    def inside_adapter(name: str) -> bool:
        return any(name.startswith(w + ".") and not name.startswith(w + ".base_layer") for w in wrappers)

    return [(n, m) for n, m in model.named_modules() if n and not inside_adapter(n)]


def tuner_layers(model: nn.Module) -> list[tuple[str, TunerLayer]]:
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, TunerLayer)]
