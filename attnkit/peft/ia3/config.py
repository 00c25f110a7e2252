"""IA³'s configuration (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", §3.3)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PeftConfig


@dataclass
class IA3Config(PeftConfig):
    """Learned vectors rescale the keys (l_k), values (l_v) and the FFN's inner activations (l_ff).

    target_modules: the Linear layers to rescale; feedforward_modules: those among them whose *input*
    is scaled (the FFN's down projection: scaling its input scales the inner activation). None = the
    family's defaults (k_proj, v_proj and the FFN down projection).
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False

    peft_type = "IA3"

    def __post_init__(self) -> None:
        for f in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, f), (set, tuple)):
                setattr(self, f, sorted(getattr(self, f)))
