"""The Houlsby adapter layer (Houlsby et al. 2019, §2.1, Fig. 2): h ← h + W_up·f(W_down·h).

It wraps a whole sublayer (attention or FFN) and transforms the sublayer's output before the
residual connection adds it to the stream. W_up starts at zero, so the adapter starts as the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...nn.ffn import get_activation
from ..tuner import TunerLayer, innermost


class BottleneckAdapter(nn.Module):
    def __init__(self, d_model: int, size: int, activation: str, dropout: float, init_scale: float,
                 ref: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, size, device=ref.device, dtype=ref.dtype)
        self.up = nn.Linear(size, d_model, device=ref.device, dtype=ref.dtype)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(self.act(self.down(h))))  # (B, T, d)


class AdapterLayer(TunerLayer):
    """Wraps a sublayer module; its output passes through the active adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.adapter.keys())

    def add(self, name: str, d_model: int, config: Any) -> None:
        ref = next(innermost(self.base_layer).parameters())
        self.adapter[name] = BottleneckAdapter(d_model, config.bottleneck_size, config.non_linearity,
                                               config.adapter_dropout, config.init_scale, ref)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        a = self.adapter[name]
        return {f"adapter_{k}": v for k, v in a.state_dict(keep_vars=True).items()}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        name = self.active()
        return out if name is None else self.adapter[name](out)

    def __getattr__(self, attr: str) -> Any:  # the wrapped sublayer's attributes (n_heads, head_dim, ...)
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr == "base_layer":
                raise
            return getattr(self.base_layer, attr)
