"""ServerState: what every handler of the OpenAI server reads — the engine, the served names, the
tokenizer's limits, the embedder and the metrics — and the model-name check of each request."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..engine.async_engine import AsyncLLMEngine
from . import errors
from .errors import APIError
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..loading.embedder import Embedder


class ServerState:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, embedder: Embedder | None, embedding_name: str | None,
                 api_key: str | None, drain_timeout: float | None) -> None:
        self.engine, self.model_name, self.api_key, self.drain_timeout = engine, model_name, api_key, drain_timeout
        self.tokenizer = engine.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer")
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.vocab_size
        self.max_token_chars = max(1, max(len(self.tokenizer.decode([i], skip_special_tokens=False))
                                          for i in range(self.tokenizer.vocab_size)))
        self.embedder, self.embedding_name = embedder, embedding_name or "embeddings"
        self.embedding_dim = embedder.encoder.encoder.cfg.d_model if embedder is not None else 0
        self.embed_lock = asyncio.Lock()
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    def check_model(self, name: str | None) -> tuple[str, str | None]:
        """(the model name to answer with, the LoRA adapter or None) of the model a request names: None or
        the base's name, ``"base:adapter"`` or an adapter's own name; 404 for any other."""
        if name is None or name == self.model_name:
            return self.model_name, None
        loras = self.engine.engine.lora_names()
        base, sep, adapter = name.partition(":")
        if sep and base == self.model_name and adapter in loras:
            return name, adapter
        if name in loras:
            return name, name
        if self.embedder is not None and name == self.embedding_name:
            raise errors.bad_request(f"`{name}` is an embedding model; use /v1/embeddings", "model")
        served = ", ".join([f"`{self.model_name}`"] + [f"`{self.model_name}:{a}`" for a in loras])
        raise APIError(404, f"The model `{name}` does not exist (this server serves {served})",
                       param="model", code="model_not_found")

    def model_cards(self) -> list[dict[str, Any]]:
        cards = [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "attnkit",
                  "max_model_len": self.max_model_len}]
        for adapter in self.engine.engine.lora_names():  # as vLLM lists LoRA modules: parent = the base
            cards.append({"id": f"{self.model_name}:{adapter}", "object": "model", "created": self.created,
                          "owned_by": "attnkit", "parent": self.model_name, "max_model_len": self.max_model_len})
        if self.embedder is not None:
            cards.append({"id": self.embedding_name, "object": "model", "created": self.created, "owned_by": "attnkit"})
        return cards
