"""Turning engine outputs into OpenAI responses: one JSON body, or server-sent events.

Streaming follows the OpenAI API: ``data: {chunk}`` events whose choices carry the new text (a
choice's last chunk carries its ``finish_reason``), with ``stream_options.include_usage`` a last
chunk with empty ``choices`` and the ``usage``, then ``data: [DONE]``. A failure after the stream
has started is sent as an ``{"error": ...}`` event, as the OpenAI API does.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.outputs import CompletionOutput, RequestOutput
from .errors import APIError
from .generation import ClientGone, Tally, merge, unless_disconnected

if TYPE_CHECKING:
    from ..engine.async_engine import RequestStream
    from .state import ServerState

log = logging.getLogger("attnkit.serve")


class Format:
    """How one endpoint spells its objects; subclasses fill in the pieces."""

    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, state: ServerState, model: str, n: int, logprobs: int | None) -> None:
        self.state, self.model, self.n, self.top = state, model, n, logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def token(self, tid: int) -> str:
        return self.state.tokenizer.decode([tid], skip_special_tokens=False)

    def request_output(self, prompt_index: int, out: RequestOutput) -> None:
        """Sees every engine output of prompt ``prompt_index`` before its choices are formatted."""

    def choice(self, index: int, out: CompletionOutput) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, index: int, text: str, out: CompletionOutput, start: int) -> dict[str, Any]:
        """A streamed choice: ``text`` new since the last chunk, logprobs of tokens ``start:``."""
        raise NotImplementedError

    def deltas(self, index: int, text: str, out: CompletionOutput, start: int) -> list[dict[str, Any]]:
        """The streamed choices for ``text`` new since the last chunk: one :meth:`delta`, or none while there is
        nothing to say; a subclass may hold text back or split it (it has then consumed ``text``)."""
        return [self.delta(index, text, out, start)] if text or out.finish_reason is not None else []

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def envelope(self, object: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


class _EventStream(StreamingResponse):
    """Server-sent events that abort their engine requests however the response ends (even unstarted)."""

    def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.close()


async def respond(request: Request, fmt: Format, streams: list[RequestStream], tally: Tally, stream: bool,
                  include_usage: bool) -> Response:
    if stream:
        return _EventStream(_events(fmt, streams, tally, include_usage), streams)
    try:
        finals = await unless_disconnected(request, _collect(streams, tally, fmt))
    except ClientGone:
        tally.record(fmt.state, len(streams) * fmt.n)
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    choices = [fmt.choice(i * fmt.n + c.index, c) for i, outs in enumerate(finals) for c in outs]
    tally.record(fmt.state, len(choices))
    return JSONResponse(fmt.envelope(fmt.object, choices, usage=tally.usage()))


async def _collect(streams: list[RequestStream], tally: Tally, fmt: Format) -> list[list[CompletionOutput]]:
    n = fmt.n
    finals: list[list[CompletionOutput]] = [[] for _ in streams]
    async for i, out in merge(streams):
        fmt.request_output(i, out)
        for c in out.outputs:
            tally.saw(i * n + c.index, len(c.token_ids), c.finish_reason)
        finals[i] = out.outputs
    return finals


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(fmt: Format, streams: list[RequestStream], tally: Tally, include_usage: bool) -> AsyncIterator[str]:
    usage_null = {"usage": None} if include_usage else {}
    total = len(streams) * fmt.n
    sent_text, sent_tokens, done = [0] * total, [0] * total, [False] * total
    try:
        for chunk in fmt.first_chunks():
            yield _sse(fmt.envelope(fmt.chunk_object, [chunk], **usage_null))
        async for i, out in merge(streams):
            fmt.request_output(i, out)
            for c in out.outputs:
                idx = i * fmt.n + c.index
                if done[idx]:
                    continue
                tally.saw(idx, len(c.token_ids), c.finish_reason)
                # no chunk for tokens without text yet (a partial character, a held-back stop string)
                chunks = fmt.deltas(idx, c.text[sent_text[idx]:], c, sent_tokens[idx])
                for chunk in chunks:
                    yield _sse(fmt.envelope(fmt.chunk_object, [chunk], **usage_null))
                sent_text[idx] = len(c.text)
                if chunks:
                    sent_tokens[idx] = len(c.token_ids)
                done[idx] = c.finish_reason is not None
        if include_usage:
            yield _sse(fmt.envelope(fmt.chunk_object, [], usage=tally.usage()))
    except APIError as e:
        yield _sse(e.body())
    except Exception:  # a bug: the status line is already sent, so say it in the stream
        log.exception("error while streaming %s", fmt.id)
        yield _sse(APIError(500, "internal server error while streaming (logged)", "server_error").body())
    finally:
        tally.record(fmt.state, total)
    yield "data: [DONE]\n\n"
