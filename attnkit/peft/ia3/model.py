"""Adding an IA³ adapter: wrap the key, value and FFN-down Linear layers in :class:`IA3Linear`."""

from __future__ import annotations

from torch import nn

from ..config import matches
from ..tuner import TunerLayer, inject, linear_selector
from .config import IA3Config
from .layer import IA3Linear


def add_ia3(model: nn.Module, name: str, config: IA3Config, default_targets: list[str],
            default_feedforward: list[str]) -> list[str]:
    targets = config.target_modules if config.target_modules is not None else default_targets
    ff = config.feedforward_modules if config.feedforward_modules is not None else default_feedforward
    if config.target_modules is not None and config.feedforward_modules is None:
        ff = [t for t in default_feedforward if matches(t, targets)] if isinstance(targets, list) else []

    def add(layer: TunerLayer, module_name: str) -> None:
        layer.add(name, feedforward=matches(module_name, ff), init_ones=config.init_ia3_weights)  # type: ignore[operator]

    done = inject(model, linear_selector(targets, "IA³"), IA3Linear, add)
    return done
