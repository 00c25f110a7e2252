"""The LoRA layer (Hu et al. 2021, §4.1): h = W₀x + (α/r)·B·A·x, with W₀ frozen.

A is initialised like a Linear layer (Kaiming-uniform) and B with zeros, so training starts from the
base model. Merging adds (α/r)·B·A into W₀ (no extra latency at inference, §4.1); unmerging subtracts it.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5) adds a learnable magnitude
m (out,), initialised to ‖W₀‖ row-wise: W' = m · (W₀ + ΔW) / ‖W₀ + ΔW‖, the norm of each output row held
constant in the backward pass (§4.3). As in HF PEFT (tuners/lora/dora.py), the layer computes
y = base(x) + (m/‖W‖ − 1)·(W₀x) + (m/‖W‖)·(α/r)·B·A·x, reusing base(x) − bias for W₀x unless dropout acts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.recompute import remember
from ..tuner import TunerLayer, base_linear, dense_weight, is_quantized


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype)


class LoraLinear(TunerLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, per adapter
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []
        self._merged_norm: dict[str, torch.Tensor] = {}  # DoRA: ‖W₀ + ΔW‖ at merge time, for unmerge

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: object, r: int | None = None, alpha: float | None = None) -> None:
        lin = base_linear(self.base_layer)
        r = config.r if r is None else r  # type: ignore[attr-defined]
        alpha = config.lora_alpha if alpha is None else alpha  # type: ignore[attr-defined]
        w = self.base_weight() if isinstance(lin, nn.Linear) else torch.empty(0)  # a quantized base: float32
        self.lora_A[name] = nn.Linear(lin.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, lin.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        p = config.lora_dropout  # type: ignore[attr-defined]
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)  # type: ignore[attr-defined]
        if getattr(config, "use_dora", False):
            with torch.no_grad():
                m = self.weight_norm(self.base_weight(), self.delta_weight(name))
            self.lora_magnitude_vector[name] = nn.Parameter(m)

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        super().delete(name)
        self.scaling.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def delta_weight(self, name: str) -> torch.Tensor:
        """(α/r)·B·A: (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def base_weight(self) -> torch.Tensor:
        """W₀ (out, in) of the linear layer under the wrappers (a quantized base's dequantized to float32)."""
        return dense_weight(self.base_layer)

    @staticmethod
    def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W₀ + ΔW‖ of each output row (DoRA Eq. 5's column-wise norm of the (in, out) matrix): (out,)."""
        return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W ← W + ΔW, or for DoRA W ← m/‖W₀ + ΔW‖ · (W + ΔW) with the norm taken on the unmerged W₀."""
        if name in self.merged:
            return
        if is_quantized(self.base_layer):
            raise ValueError(f"adapter {name!r}: the base layer is quantized ({type(base_linear(self.base_layer)).__name__}) "
                             "and cannot take a merge; export the merged model instead (attnkit export --gguf)")
        lin = base_linear(self.base_layer)
        delta = self.delta_weight(name).to(lin.weight.dtype)
        if name in self.lora_magnitude_vector:
            others = list(self.merged)
            for n in reversed(others):
                self.unmerge(n)
            norm = self.weight_norm(lin.weight, delta)
            for n in others:
                self.merge(n)
            self._merged_norm[name] = norm
            factor = (self.lora_magnitude_vector[name] / norm).view(-1, 1)
            lin.weight.copy_(factor * (lin.weight + delta))
        else:
            lin.weight += delta
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """The inverse of :meth:`merge`; adapters merged after ``name`` are taken out and merged again."""
        if name not in self.merged:
            return
        later = self.merged[self.merged.index(name) + 1:]
        for n in reversed(later):
            self.unmerge(n)
        lin = base_linear(self.base_layer)
        delta = self.delta_weight(name).to(lin.weight.dtype)
        if name in self.lora_magnitude_vector:
            factor = (self.lora_magnitude_vector[name] / self._merged_norm.pop(name)).view(-1, 1)
            lin.weight.copy_(lin.weight / factor - delta)
        else:
            lin.weight -= delta
        self.merged.remove(name)
        for n in later:
            self.merge(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)  # (..., out)
        name = self.active()
        if name is None or name in self.merged:
            return y
        A, B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            return (y + self._dora(name, x.to(A.weight.dtype), y)).to(y.dtype)
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast A casts x to its dtype itself: a
            x = x.to(A.weight.dtype)                      # float32 copy here would be cast straight back)
        h = A(dropout(x))  # (..., r)
        if B.bias is None and h.dtype == y.dtype:  # y + s·h·Bᵀ in one product: no (..., out) temporaries
            return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.weight.t(),
                               alpha=self.scaling[name]).view(y.shape)
        return y + B(h).to(y.dtype) * self.scaling[name]

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """W₀x. Training under autocast, a frozen float W₀ is cast here, where the cast can be named for
        :mod:`attnkit.nn.recompute`: its backward casts W₀ again instead of keeping autocast's copy of every layer's
        weight through the step (the default model: ~200 MB a micro-batch)."""
        lin = self.base_layer
        dev = x.device.type
        if type(lin) is nn.Linear and torch.is_grad_enabled() and torch.is_autocast_enabled(dev) \
                and not lin.weight.requires_grad and lin.weight.dtype != torch.get_autocast_dtype(dev):
            dt = torch.get_autocast_dtype(dev)
            return F.linear(x, remember(lin.weight.to(dt), _cast, lin.weight, dt), lin.bias)
        return lin(x)

    def _dora(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m/‖W‖ − 1)·W₀x + (m/‖W‖)·(α/r)·B·A·x, ‖W‖ = ‖W₀ + (α/r)·B·A‖ detached (DoRA §4.3); PEFT's
        DoraLinearLayer.forward: W₀x is base(x) − bias, or W₀·dropout(x) when dropout acts."""
        A, B, dropout, s = self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
        weight = self.base_weight().to(x.dtype)
        lora_weight = (B.weight @ A.weight).to(x.dtype)
        norm = self.weight_norm(weight, s * lora_weight.detach()).detach()
        scale = (self.lora_magnitude_vector[name] / norm).view(1, -1)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = base_linear(self.base_layer).bias
            base = y if bias is None else y - bias
        else:
            x = dropout(x)
            base = F.linear(x, weight)
        return (scale - 1) * base + scale * B(A(x)) * s
