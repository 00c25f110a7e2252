"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PeftConfig


@dataclass
class BottleneckConfig(PeftConfig):
    """A small down-project → nonlinearity → up-project MLP with a skip connection, inserted after the
    attention and the feed-forward sublayer of every layer (before the residual addition).

    bottleneck_size: the inner width m (parameters per adapter: 2md + m + d).
    target_modules: the sublayers the adapter follows (attnkit names; default both).
    """

    bottleneck_size: int = 64
    non_linearity: str = "gelu"
    adapter_dropout: float = 0.0
    init_scale: float = 1e-3  # down projection ~ N(0, init_scale²); up projection zero: identity at start
    target_modules: list[str] = field(default_factory=lambda: ["self_attn", "ffn"])

    peft_type = "BOTTLENECK"

    def __post_init__(self) -> None:
        if self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be positive, got {self.bottleneck_size}")
        from ...nn.ffn import get_activation

        get_activation(self.non_linearity)
