"""What prompt tuning, P-tuning and prefix tuning share: a table of ``num_virtual_tokens`` trainable
rows, optionally passed through a reparameterising network while training.

HF PEFT saves the *output* of that network (``prompt_embeddings``, (P, width)); an encoder loaded from
it is a plain table in inference mode (the network that produced it is not needed any more).
"""

from __future__ import annotations

import torch
from torch import nn


class VirtualTokens(nn.Module):
    """``embedding``: (P, width_in); ``encode(table)`` → (P, width_out). Subclasses define ``encode``."""

    def __init__(self, num_virtual_tokens: int, width_in: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width_in)
        self.inference_mode = False

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        return table

    def forward(self) -> torch.Tensor:
        """The virtual tokens (P, width_out)."""
        table = self.embedding.weight
        return table if self.inference_mode else self.encode(table)

    def prompt_embeddings(self) -> torch.Tensor:
        """What HF PEFT stores as ``prompt_embeddings``."""
        return self.forward().detach().clone()

    def load_prompt_embeddings(self, t: torch.Tensor) -> None:
        """Become a plain table holding ``t`` (P, width_out); any reparameterising network is dropped."""
        P = self.embedding.num_embeddings
        if t.dim() != 2 or t.shape[0] != P:
            raise ValueError(f"prompt_embeddings of shape {tuple(t.shape)} do not fit {P} virtual tokens")
        for name in list(self._modules):
            if name != "embedding":
                delattr(self, name)
        w = self.embedding.weight
        self.embedding = nn.Embedding(P, t.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(t)
        self.inference_mode = True
