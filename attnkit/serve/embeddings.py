"""POST /v1/embeddings: sentence embeddings from a BERT-family model (:class:`attnkit.loading.embedder.Embedder`).

Texts are truncated to the model's ``max_seq_length`` as sentence-transformers does; ``usage``
counts the tokens after truncation. ``encoding_format: "base64"`` (what the openai client asks for
by default) is the little-endian float32 bytes, base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import APIError, bad_request, parse_body
from .protocol import EmbeddingRequest

if TYPE_CHECKING:
    from .state import ServerState


def _embed(state: ServerState, texts: list[str]) -> tuple[np.ndarray, int]:
    emb = state.embedder
    assert emb is not None
    num_tokens = sum(len(ids) for ids in emb.tokenizer.encode_batch(texts))
    return emb.embed(texts).float().numpy(), num_tokens


async def create_embedding(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.serve
    req = await parse_body(request, EmbeddingRequest)
    if state.embedder is None:
        raise APIError(404, "this server has no embedding model (start it without --no-embeddings)", param="model",
                       code="model_not_found")
    if req.model is not None and req.model != state.embedding_name:
        raise APIError(404, f"The model `{req.model}` does not exist or is not an embedding model; this server "
                       f"embeds with `{state.embedding_name}`", param="model", code="model_not_found")
    dim = state.embedding_dim
    if req.dimensions is not None and req.dimensions != dim:
        raise bad_request(f"dimensions: {state.embedding_name} produces {dim}-dimensional embeddings; "
                          f"other sizes are not supported (got {req.dimensions})", "dimensions")
    async with state.embed_lock:  # one batch at a time beside the engine's forward passes
        vecs, num_tokens = await asyncio.to_thread(_embed, state, req.texts)
    data = []
    for i, v in enumerate(vecs):
        value = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if req.encoding_format == "base64"
                 else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": state.embedding_name,
                         "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})
