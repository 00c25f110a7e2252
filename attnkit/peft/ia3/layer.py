"""The IA³ layer (Liu et al. 2022, §3.3): softmax(Q(l_k ⊙ K)ᵀ/√d)(l_v ⊙ V) and (l_ff ⊙ γ(W₁x))W₂.

On a key/value projection the learned vector scales the output, y = l ⊙ (Wx + b); on the FFN's down
projection it scales the input, y = W(l ⊙ x) + b. The vectors start at ones (the base model).
Merging multiplies them into W (and b).
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuner import TunerLayer, base_linear


class IA3Linear(TunerLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add(self, name: str, feedforward: bool, init_ones: bool = True) -> None:
        lin = base_linear(self.base_layer)
        w = lin.weight
        shape = (1, lin.in_features) if feedforward else (lin.out_features, 1)  # HF PEFT's shapes
        t = torch.ones(shape, device=w.device, dtype=w.dtype)
        self.ia3_l[name] = nn.Parameter(t if init_ones else nn.init.normal_(t, 1.0, 0.02))
        self.is_feedforward[name] = feedforward

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        super().delete(name)
        self.is_feedforward.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    @torch.no_grad()
    def _scale(self, name: str, inverse: bool) -> None:
        lin = base_linear(self.base_layer)
        l = self.ia3_l[name].to(lin.weight.dtype)
        l = 1.0 / l if inverse else l
        if self.is_feedforward[name]:
            lin.weight *= l  # (out, in) · (1, in)
        else:
            lin.weight *= l  # (out, in) · (out, 1)
            if lin.bias is not None:
                lin.bias *= l[:, 0]

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self._scale(name, inverse=False)
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self._scale(name, inverse=True)
            self.merged.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active()
        if name is None or name in self.merged:
            return self.base_layer(x)
        l = self.ia3_l[name]
        if self.is_feedforward[name]:
            return self.base_layer(x * l[0].to(x.dtype))  # (..., in)
        y = self.base_layer(x)
        return y * l[:, 0].to(y.dtype)  # (..., out)
