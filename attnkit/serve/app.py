"""The OpenAI-compatible FastAPI app: ``build_app(engine, model_name, ...)``.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models[/{id}], POST /v1/completions,
POST /v1/chat/completions, POST /v1/responses (OpenAI's Responses API on the chat pipeline),
POST /v1/embeddings. With an API key every /v1 route needs
``Authorization: Bearer KEY`` (401 otherwise); /health and /metrics stay open for probes and
scrapers. Shutting down (the app's lifespan end) drains the engine: in-flight requests finish,
new ones get 503.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..engine.async_engine import AsyncLLMEngine
from ..engine.llm_engine import LLMEngine
from . import errors
from .chat import create_chat_completion
from .completions import create_completion
from .embeddings import create_embedding
from .errors import APIError
from .metrics import CONTENT_TYPE, ServerMetrics
from .responses import create_response
from .state import ServerState

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from ..loading.embedder import Embedder

_ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses",
              "/v1/embeddings"}


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI: streaming and disconnects untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.http_requests.labels(endpoint, str(status[0])).inc()


def build_app(engine: AsyncLLMEngine | LLMEngine, model_name: str = "attnkit", *, embedder: Embedder | None = None,
              embedding_name: str | None = None, api_key: str | None = None,
              drain_timeout: float | None = 60.0) -> FastAPI:
    """An app serving ``engine`` under ``model_name`` (and ``embedder``, if given, under ``embedding_name``)."""
    aengine = AsyncLLMEngine(engine) if isinstance(engine, LLMEngine) else engine  # or a DataParallelEngine
    state = ServerState(aengine, model_name, embedder, embedding_name, api_key, drain_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await aengine.drain(state.drain_timeout)
        await aengine.shutdown()

    app = FastAPI(title="attnkit OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    errors.install(app)
    app.add_middleware(_CountRequests, metrics=state.metrics)

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": state.model_cards()}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        for card in state.model_cards():
            if card["id"] == model_id:
                return card
        raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")

    v1.add_api_route("/completions", create_completion, methods=["POST"])
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    v1.add_api_route("/responses", create_response, methods=["POST"])
    v1.add_api_route("/embeddings", create_embedding, methods=["POST"])
    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if aengine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
