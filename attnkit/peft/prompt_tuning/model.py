"""The soft prompt (Lester et al. 2021, §2): P trainable embeddings, prepended to the input embeddings."""

from __future__ import annotations

import torch
from torch import nn

from ..prompt_encoder import VirtualTokens
from .config import PromptTuningConfig


class PromptEmbedding(VirtualTokens):
    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding,
                 init_token_ids: list[int] | None = None, scale: float = 1.0) -> None:
        """``scale``: the model's embedding scale (Gemma: √d): the soft prompt lives among the scaled input
        embeddings (as HF PEFT's, initialised from ``word_embeddings(ids)``)."""
        super().__init__(config.num_virtual_tokens, word_embeddings.embedding_dim)
        w = word_embeddings.weight.detach()
        if scale != 1.0:
            w = w * torch.tensor(scale, dtype=w.dtype)
        self.embedding.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if config.prompt_tuning_init == "TEXT":
                if not init_token_ids:
                    raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer (pass tokenizer= to get_peft_model)")
                P = config.num_virtual_tokens
                ids = (init_token_ids * (P // len(init_token_ids) + 1))[:P]
                self.embedding.weight.copy_(w[torch.tensor(ids, device=w.device)])
            else:  # random rows of the vocabulary's scale
                self.embedding.weight.normal_(0.0, float(w.std()))
