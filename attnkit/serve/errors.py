"""Errors as OpenAI clients expect them: ``{"error": {"message", "type", "param", "code"}}``.

400 invalid JSON or parameters, 401 a missing or wrong API key, 404 an unknown model or route,
413 a body over the size limit, 503 a full waiting queue or a server shutting down. A 500 only
ever comes from a bug in the server, never from what a client sent (and it is logged).
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("attnkit.serve")

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 8 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _describe(model: type[BaseModel], errors: list[dict[str, Any]]) -> APIError:
    """One clear message for a pydantic error list: the field's path and what is wrong with it."""
    e = errors[0]
    loc = [str(p) if len(str(p)) <= 64 else str(p)[:64] + "…" for p in e["loc"]]
    if e["type"] == "extra_forbidden":
        return bad_request(f"unknown field `{'.'.join(loc)}` (this server does not support it)", ".".join(loc))
    if e["type"] == "missing":
        return bad_request(f"`{'.'.join(loc)}` is required", ".".join(loc))
    if not loc:  # a model-level check
        msg = e["msg"].removeprefix("Value error, ")
        return bad_request(msg, msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in model.model_fields else None)
    # inside a union pydantic names each alternative it tried ('prompt', 'list[int]', 0): report the field's type
    union = [p for p in loc if "[" in p or p in ("str", "int", "float", "bool")]
    field = loc[0]
    if union and field in model.model_fields:
        want = str(model.model_fields[field].annotation).replace("typing.", "").replace("Union", "one of ")
        return bad_request(f"`{field}` has an invalid value (expected {want})", field)
    path = ".".join(loc)
    return bad_request(f"`{path}`: {e['msg']}", path)


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body: strict JSON (no NaN), bounded size and depth, no unknown fields."""
    chunks, size = [], 0
    async for chunk in request.stream():  # stop reading at the limit rather than buffer any size
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _describe(model, e.errors(include_url=False)) from None
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None


def install(app: FastAPI) -> None:
    """Exception handlers turning every failure into an OpenAI-shaped error."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return APIError(exc.status_code, msg, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        where = ".".join(str(p) for p in errs[0]["loc"]) if errs else None
        return bad_request(f"invalid request: {errs[0]['msg'] if errs else exc}", where).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error (a bug in the server; it has been logged)",
                        "server_error").response()
