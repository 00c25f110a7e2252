"""Adding a LoRA adapter to a model: wrap every target Linear in a :class:`LoraLinear`."""

from __future__ import annotations

from torch import nn

from ..config import pattern_value
from ..tuner import TunerLayer, inject, linear_selector
from .config import LoraConfig
from .layer import LoraLinear


def add_lora(model: nn.Module, name: str, config: LoraConfig, default_targets: list[str]) -> list[str]:
    targets = config.target_modules if config.target_modules is not None else default_targets

    def add(layer: TunerLayer, module_name: str) -> None:
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.lora_alpha)
        layer.add(name, config, r=r, alpha=alpha)  # type: ignore[operator]

    return inject(model, linear_selector(targets, "LoRA"), LoraLinear, add)
