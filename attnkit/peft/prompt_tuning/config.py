"""Prompt tuning's configuration (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PeftConfig


@dataclass
class PromptTuningConfig(PeftConfig):
    """``num_virtual_tokens`` trainable input embeddings prepended to every input (§2).

    prompt_tuning_init: "RANDOM", or "TEXT": the embeddings of ``prompt_tuning_init_text``'s tokens,
    repeated to fill the prompt (§3.2: initialising from real vocabulary beats random).
    token_dim / num_layers / num_attention_heads: filled from the model (HF PEFT writes them).
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1

    peft_type = "PROMPT_TUNING"
    is_prompt_learning = True

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.prompt_tuning_init not in ("RANDOM", "TEXT"):
            raise ValueError(f"prompt_tuning_init must be 'RANDOM' or 'TEXT', got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
