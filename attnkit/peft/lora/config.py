"""LoRA's configuration (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PeftConfig


@dataclass
class LoraConfig(PeftConfig):
    """W' = W + (α/r)·B·A on the ``target_modules`` Linear layers; A: (r, in), B: (out, r), B = 0 at start.

    target_modules: names (suffix match) or one regex; None = the family's default (q_proj, v_proj).
    use_rslora: scale by α/√r instead (Kalajdzievski 2023). use_dora: DoRA (Liu et al. 2024), a learnable
    magnitude per output row times the direction (W + ΔW)/‖W + ΔW‖ (see :mod:`attnkit.peft.lora.layer`).
    rank_pattern / alpha_pattern: per-module overrides keyed by a module-name suffix, as in HF PEFT.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    fan_in_fan_out: bool = False  # HF's flag for GPT-2's Conv1D; attnkit's layers are all nn.Linear

    peft_type = "LORA"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ValueError(f"LoRA bias={self.bias!r} is not supported (only 'none')")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
