"""Learning-rate schedules."""

from __future__ import annotations

import torch


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """lrate = d_model^−0.5 · min(step^−0.5, step · warmup^−1.5)   (Vaswani et al. 2017, eq. 3).

    Rises linearly for ``warmup`` steps, then decays with the inverse square root of the step.
    """
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def noam_scheduler(optimizer: torch.optim.Optimizer, d_model: int, warmup: int, factor: float = 1.0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose multiplier is :func:`noam_lr` (set the optimizer's base lr to 1.0)."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: noam_lr(s + 1, d_model, warmup, factor))


def paper_adam(params, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9) -> torch.optim.Adam:
    """Adam with β1 = 0.9, β2 = 0.98, ε = 10⁻⁹ (§5.3)."""
    return torch.optim.Adam(params, lr=1.0, betas=betas, eps=eps)
