"""Prefix tuning's configuration (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PeftConfig


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Trainable key/value prefixes of ``num_virtual_tokens`` positions in every attention layer (§4.2).

    prefix_projection: train them through an MLP (embedding → tanh MLP of width ``encoder_hidden_size``,
    §4.3's reparameterisation); after training only its output is kept.
    token_dim (n_kv_heads · head_dim), num_layers, num_attention_heads (the K/V heads): filled from the model.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1

    peft_type = "PREFIX_TUNING"
    is_prompt_learning = True

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
