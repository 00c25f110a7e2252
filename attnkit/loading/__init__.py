"""Loading pretrained checkpoints — GGUF files and Hugging Face directories — without pickle.

``load_causal_lm(path)`` → model + tokenizer + generation defaults for text generation;
``load_sentence_encoder(path)`` → an :class:`~attnkit.embeddings.Embedder`. ``path=None`` is the
embedded default model (:mod:`attnkit.loading.defaults`). Every failure is a :class:`ModelLoadError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:
    from ..embeddings import Embedder
    from ..models.gpt2 import GPT2
    from ..models.llama import Llama
    from ..text.tokenizer import Tokenizer

__all__ = ["CausalLM", "ModelLoadError", "UnsupportedModelError", "load_causal_lm", "load_sentence_encoder"]


@dataclass
class CausalLM:
    model: Llama | GPT2
    tokenizer: Tokenizer
    path: Path
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json (HF dirs)

    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation.get("eos_token_id")
        extra = set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
        return set(self.tokenizer.eos_ids) | extra


def _kind(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    raise ModelLoadError(path, "not a GGUF file nor a Hugging Face directory with config.json")


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> CausalLM:
    from ..text.tokenizer import Tokenizer
    from .defaults import default_chat_model

    path = default_chat_model() if path is None else Path(path)
    if _kind(path) == "gguf":
        from .gguf import load_gguf_model
        from .gguf_file import GGUFFile

        g = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf(g.metadata, path)  # first: a bad vocabulary fails before the weights load
        return CausalLM(load_gguf_model(path, dtype, g=g), tokenizer, path)
    from .hf import load_hf_model, read_json

    model = load_hf_model(path, dtype)
    if not hasattr(model, "new_cache"):
        raise ModelLoadError(path, f"{type(model).__name__} is an encoder, not a language model; use `attnkit embed`")
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    return CausalLM(model, Tokenizer.from_dir(path), path, gen)


def load_sentence_encoder(path: str | Path | None = None) -> Embedder:
    from ..embeddings import Embedder
    from ..models.bert import Bert, SentenceEncoder
    from ..text.tokenizer import Tokenizer
    from .defaults import default_embedding_model
    from .hf import load_hf_model, sentence_transformers_config

    path = default_embedding_model() if path is None else Path(path)
    if _kind(path) != "hf":
        raise ModelLoadError(path, "embeddings need a Hugging Face directory of a BERT-family model")
    model = load_hf_model(path)
    if not isinstance(model, Bert):
        raise ModelLoadError(path, f"{type(model).__name__} is not an encoder; embeddings need a BERT-family model")
    pooling, normalize, max_len = sentence_transformers_config(path, model.cfg.max_seq_len)
    return Embedder(SentenceEncoder(model, pooling, normalize), Tokenizer.from_dir(path), max_len)
