"""The LoRA layer (Hu et al. 2021, §4.1): h = W₀x + (α/r)·B·A·x, with W₀ frozen.

A is initialised like a Linear layer (Kaiming-uniform) and B with zeros, so training starts from the
base model. Merging adds (α/r)·B·A into W₀ (no extra latency at inference, §4.1); unmerging subtracts it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..tuner import TunerLayer, base_linear


class LoraLinear(TunerLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: object, r: int | None = None, alpha: float | None = None) -> None:
        lin = base_linear(self.base_layer)
        r = config.r if r is None else r  # type: ignore[attr-defined]
        alpha = config.lora_alpha if alpha is None else alpha  # type: ignore[attr-defined]
        w = lin.weight
        self.lora_A[name] = nn.Linear(lin.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, lin.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        p = config.lora_dropout  # type: ignore[attr-defined]
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)  # type: ignore[attr-defined]

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        super().delete(name)
        self.scaling.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def delta_weight(self, name: str) -> torch.Tensor:
        """(α/r)·B·A: (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.merged:
            lin = base_linear(self.base_layer)
            lin.weight += self.delta_weight(name).to(lin.weight.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            lin = base_linear(self.base_layer)
            lin.weight -= self.delta_weight(name).to(lin.weight.dtype)
            self.merged.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        name = self.active()
        if name is None or name in self.merged:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        return y + B(A(self.lora_dropout[name](x.to(A.weight.dtype)))).to(y.dtype) * self.scaling[name]
