"""Adding bottleneck adapters after the attention and feed-forward sublayers of every layer."""

from __future__ import annotations

from torch import nn

from ..config import matches
from ..tuner import TunerLayer, inject
from .config import BottleneckConfig
from .layer import AdapterLayer


def add_bottleneck(model: nn.Module, name: str, config: BottleneckConfig, d_model: int) -> list[str]:
    def select(module_name: str, module: nn.Module) -> bool:
        return module_name.startswith("layers.") and matches(module_name, config.target_modules)

    def add(layer: TunerLayer, module_name: str) -> None:
        layer.add(name, d_model, config)  # type: ignore[operator]

    return inject(model, select, AdapterLayer, add)
