"""Building a smaller student from a decoder by dropping whole layers.

Which layers: ``every_other`` keeps an evenly spaced subset (always the first and the last layer),
as DistilBERT initialises its student from every other teacher layer (Sanh et al. 2019, §3);
``importance`` measures each layer's Block Influence on held-out text,
BI_l = 1 − E_t[cos(h_{l−1,t}, h_{l,t})] (Men et al. 2024, "ShortGPT", §3.1): a layer that barely
turns the hidden state can go first.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn


def evenly_kept(n_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices of ``n_layers``, including the first and the last."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"cannot keep {keep} of {n_layers} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """BI of every layer (higher = more important), averaged over the tokens of ``batches`` (B, T)."""
    layers = model.layers  # type: ignore[attr-defined]
    inputs: dict[int, torch.Tensor] = {}
    sims = torch.zeros(len(layers))
    count = 0

    def pre(i: int):
        def hook(mod: nn.Module, args: tuple) -> None:
            inputs[i] = args[0]
        return hook

    def post(i: int):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            sims[i] += F.cosine_similarity(inputs[i].float(), out.float(), dim=-1).sum()
        return hook

    handles = [l.register_forward_pre_hook(pre(i)) for i, l in enumerate(layers)]
    handles += [l.register_forward_hook(post(i)) for i, l in enumerate(layers)]
    try:
        model.eval()
        for x in batches:
            model(x)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sims / max(count, 1)).tolist()


def by_importance(scores: list[float], keep: int) -> list[int]:
    """The ``keep`` layers of highest score, in their original order."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"cannot keep {keep} of {len(scores)} layers")
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of ``model`` (Llama or GPT-2) with only the layers ``keep``; everything else shared-by-copy."""
    n = len(model.layers)  # type: ignore[attr-defined]
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep must be increasing layer indices in [0, {n}), got {keep}")
    layers = model.layers  # type: ignore[attr-defined]
    model.layers = nn.ModuleList()  # type: ignore[attr-defined]
    try:
        student = copy.deepcopy(model)
    finally:
        model.layers = layers  # type: ignore[attr-defined]
    student.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in keep)  # type: ignore[attr-defined]
    student.cfg = replace(model.cfg, n_layers=len(keep))  # type: ignore[attr-defined]
    return student


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
