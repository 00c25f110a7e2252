"""Sentence embeddings: tokenise, pad, encode, pool (see :mod:`attnkit.models.bert`)."""

from __future__ import annotations

import torch

from ..models.bert import SentenceEncoder
from ..text.tokenizer import Tokenizer


class Embedder:
    """texts → (N, d) embeddings, truncating each text to ``max_len`` tokens like sentence-transformers."""

    def __init__(self, encoder: SentenceEncoder, tokenizer: Tokenizer, max_len: int) -> None:
        self.encoder, self.tokenizer, self.max_len = encoder, tokenizer, max_len
        tokenizer.tk.enable_truncation(max_len)  # keeps [CLS] … [SEP], as sentence-transformers' tokenizer call

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer.encode_batch(texts[i : i + batch_size])
            T = max(len(x) for x in ids)
            pad = self.tokenizer.pad_id or 0
            idx = torch.tensor([x + [pad] * (T - len(x)) for x in ids])  # (B, T)
            mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])  # (B, T)
            out.append(self.encoder(idx, mask))
        return torch.cat(out) if out else torch.empty(0, self.encoder.encoder.cfg.d_model)


def cosine_matrix(e: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``e`` (N, d) → (N, N)."""
    e = torch.nn.functional.normalize(e, dim=-1)
    return e @ e.T
