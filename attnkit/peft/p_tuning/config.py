"""P-tuning's configuration (Liu et al. 2021, "GPT Understands, Too")."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PeftConfig


@dataclass
class PromptEncoderConfig(PeftConfig):
    """Virtual tokens produced by a prompt encoder (§3.2): a bidirectional LSTM + MLP, or an MLP.

    encoder_reparameterization_type: "MLP" | "LSTM"; encoder_hidden_size: the encoder's width.
    """

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1

    peft_type = "P_TUNING"
    is_prompt_learning = True

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                             f"got {self.encoder_reparameterization_type!r}")
