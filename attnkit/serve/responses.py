"""POST /v1/responses: OpenAI's Responses API (https://platform.openai.com/docs/api-reference/responses/create)
on the chat pipeline.

A Responses request is translated into a chat completion request — ``instructions`` as a first system message,
then the ``input`` items (a string is one user message; ``message`` items keep their role, ``developer`` included;
``function_call`` items become an assistant message's ``tool_calls``, ``function_call_output`` items ``tool``
messages), ``max_output_tokens`` as ``max_completion_tokens``, the flat function tools as chat's nested ones,
``text.format`` as ``response_format`` — and validated by :func:`attnkit.serve.chat.prepare_chat`, so a greedy
response equals the greedy chat completion of the same conversation. A problem is a 400 naming the Responses
field (``input.3``, ``max_output_tokens``, ``text.format``), not the chat one it was checked as.

The answer is a ``response`` object as OpenAI returns it (``output`` items: one ``message`` with an ``output_text``
part, ``function_call`` items when the model calls tools; ``status`` ``incomplete`` with
``incomplete_details.reason = "max_output_tokens"`` when the token limit cut it). Streaming sends OpenAI's typed
server-sent events (``event: <type>`` + ``data: {..., "sequence_number": n}``): ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``…, ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` (``response.function_call_arguments.delta``/``.done`` for a call), then
``response.completed`` — or ``response.incomplete`` — with the whole object. A failure after the stream started is
an ``error`` event. With tools the text goes through the chat job's incremental tool-call parser
(:mod:`attnkit.serve.tool_parsers`): content streams as text deltas, a call as its own item whose arguments stream
as they are generated, and text that may open a call waits until the parser has decided.

Nothing is stored: ``store: true`` and ``previous_response_id`` are refused (send the conversation as ``input``),
and every response says ``"store": false``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError

from ..engine.outputs import CompletionOutput
from .chat import ChatJob, prepare_chat
from .errors import APIError, _describe, bad_request, parse_body
from .formatting import _EventStream
from .generation import ClientGone, Tally, merge, start, unless_disconnected
from .protocol import (ChatCompletionRequest, ResponsesFunctionCall, ResponsesFunctionCallOutput, ResponsesInputItem,
                       ResponsesMessage, ResponsesRequest)
from .tools import call_id

if TYPE_CHECKING:
    from ..engine.async_engine import RequestStream
    from .state import ServerState

log = logging.getLogger("attnkit.serve")

_ITEM = TypeAdapter(ResponsesInputItem)
_BRANCHES = {"str", "message", "function_call", "function_call_output", "input_text", "output_text"}


# --- request: Responses -> chat ---------------------------------------------------------------------------------


def _items(req: ResponsesRequest) -> list[Any]:
    """The ``input`` as validated items; an error names the item and the field in it (``input.2.content.0.type``)."""
    if isinstance(req.input, str):
        return [ResponsesMessage(role="user", content=req.input)]
    items = []
    for i, raw in enumerate(req.input):
        try:
            items.append(_ITEM.validate_python(raw, strict=True))
        except ValidationError as e:
            err = max(e.errors(include_url=False), key=lambda d: len(d["loc"]))  # the most specific alternative
            loc = [str(p) for p in err["loc"] if not (p in _BRANCHES or "[" in str(p))]
            path = ".".join([f"input.{i}", *loc])
            if err["type"] == "extra_forbidden":
                raise bad_request(f"unknown field `{path}` (this server does not support it)", path) from None
            if err["type"] == "missing":
                raise bad_request(f"`{path}` is required", path) from None
            raise bad_request(f"`{path}`: {err['msg']}", path) from None
    return items


def _chat_body(req: ResponsesRequest, items: list[Any]) -> tuple[dict[str, Any], list[list[str]]]:
    """The equivalent chat completion request, and for each of its messages the Responses fields it came from:
    the message's, then (an assistant turn's) each of its ``tool_calls``'."""
    messages: list[dict[str, Any]] = []
    where: list[list[str]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
        where.append(["instructions"])
    prev: Any = None
    for i, item in enumerate(items):
        path = "input" if isinstance(req.input, str) else f"input.{i}"
        if isinstance(item, ResponsesMessage):
            messages.append({"role": item.role, "content": item.text})
            where.append([path])
        elif isinstance(item, ResponsesFunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            # calls right after assistant text (or after each other) are that assistant turn's tool_calls
            if isinstance(prev, (ResponsesFunctionCall, ResponsesMessage)) and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
                where[-1].append(path)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                where.append([path, path])
        elif isinstance(item, ResponsesFunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
            where.append([path])
        prev = item
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.tools is not None:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "function": {"name": tc.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None:
        if fmt.type == "json_schema":
            spec = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {k: v for k, v in spec.items() if v is not None}}
        else:
            body["response_format"] = {"type": fmt.type}
    return body, where


def _renamed(e: APIError, where: list[list[str]]) -> APIError:
    """``e`` (raised about the chat request) in the Responses request's field names: ``messages.2`` or
    ``messages[2]`` is the input item it came from (``instructions`` for the first system message), a call in
    its ``tool_calls`` that call's ``function_call`` item (``.name``, ``.arguments``, ``.call_id``)."""

    def message_path(m: re.Match) -> str:
        i = int(m[1] or m[2])
        if i >= len(where):
            return "input"
        rest = re.sub(r"\[(\d+)\]", r".\1", m[3]).strip(".").split(".")
        if rest[0] == "tool_calls" and len(rest) > 1 and rest[1].isdigit() and int(rest[1]) + 1 < len(where[i]):
            field = {"name": "name", "arguments": "arguments", "id": "call_id"}.get(rest[-1])
            return where[i][int(rest[1]) + 1] + (f".{field}" if field else "")
        return where[i][0]

    def rename(s: str) -> str:
        s = re.sub(r"\bmessages(?:\.(\d+)|\[(\d+)\])((?:\.\w+|\[\d+\])*)", message_path, s)
        s = re.sub(r"\bmax_(?:completion_)?tokens\b", "max_output_tokens", s)
        s = re.sub(r"\bresponse_format(?:\.json_schema)?\b", "text.format", s)
        s = re.sub(r"\btools(?:\.(\d+)|\[(\d+)\])\.function\b", lambda m: f"tools.{m[1] or m[2]}", s)
        return re.sub(r"\btool_choice\.function\b", "tool_choice", s)

    param = rename(e.param) if e.param else e.param
    if param == "messages":
        param = "input"
    message = re.sub(r"`messages`|^messages\b", "input", rename(e.message))
    return APIError(e.status, message, e.type, param, e.code, e.headers)


async def prepare_response(state: ServerState, req: ResponsesRequest) -> ChatJob:
    """Check ``req`` and prepare it as a chat job; every problem is a 400 naming the Responses field."""
    if req.store:
        raise bad_request("this server does not store responses: send `store: false` (or leave it out)", "store")
    if req.previous_response_id is not None:
        raise bad_request("this server does not store responses, so there is no previous response to continue: "
                          "send the whole conversation as `input`", "previous_response_id")
    items = _items(req)
    body, where = _chat_body(req, items)
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise _renamed(_describe(ChatCompletionRequest, e.errors(include_url=False)), where) from None
    try:
        return await prepare_chat(state, chat)
    except APIError as e:
        raise _renamed(e, where) from None


# --- response objects ------------------------------------------------------------------------------------------


class _Response:
    """One response object as it grows: the request's echo, the output items, the usage."""

    def __init__(self, req: ResponsesRequest, job: ChatJob) -> None:
        self.req, self.job = req, job
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self.usage: dict[str, Any] | None = None
        self.completed_at: int | None = None

    def body(self) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        tc = req.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status,
            "completed_at": self.completed_at, "background": False, "error": None,
            "incomplete_details": self.incomplete, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None, "model": self.job.model,
            "output": self.output,
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": "auto" if tc is None else (tc if isinstance(tc, str) else tc.model_dump()),
            "tools": [t.model_dump() for t in req.tools or []],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": self.usage,
            "user": req.user, "metadata": req.metadata or {},
        }

    def finish(self, out: CompletionOutput, tally: Tally) -> None:
        """The final status and usage; the output items are set by the caller."""
        cut = out.finish_reason == "length"
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.completed_at = int(time.time())
        self.usage = {"input_tokens": tally.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": tally.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": tally.prompt_tokens + tally.completion_tokens}

    @property
    def item_status(self) -> str:
        return "incomplete" if self.status == "incomplete" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Plain:
    """The parser of a request without tools: all text is content."""

    def feed(self, text: str) -> list[tuple]:
        return [("content", text)] if text else []

    def finish(self) -> list[tuple]:
        return []


class _Events:
    """Typed server-sent events with increasing ``sequence_number``."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, type: str, **data: Any) -> str:
        obj = {"type": type, "sequence_number": self.n, **data}
        self.n += 1
        return f"event: {type}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Output:
    """The output items, built from the tool parser's events (``("content", text)``, ``("call", i, name)``,
    ``("args", i, text)``, :mod:`attnkit.serve.tool_parsers`): a run of content is a ``message`` item, each call
    a ``function_call`` item, in the order they were generated. With ``ev`` it also writes the streaming events
    that announce them (:meth:`take`); only the last item can be cut short (``status`` "incomplete")."""

    def __init__(self, ev: _Events | None = None) -> None:
        self.ev = ev
        self.items: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.sse: list[str] = []

    def _emit(self, type: str, **data: Any) -> None:
        if self.ev is not None:
            self.sse.append(self.ev(type, **data))

    def take(self) -> list[str]:
        sse, self.sse = self.sse, []
        return sse

    def apply(self, event: tuple) -> None:
        if event[0] == "content":
            if self.open is None or self.open["type"] != "message":
                self._open_message()
            self.text += event[1]
            self._emit("response.output_text.delta", item_id=self.open["id"], output_index=len(self.items) - 1,
                       content_index=0, delta=event[1], logprobs=[])
        elif event[0] == "call":
            self._close("completed")
            self.open = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id(),
                         "name": event[2], "arguments": "", "status": "in_progress"}
            self.items.append(self.open)
            self.calls.append(self.open)
            self._emit("response.output_item.added", output_index=len(self.items) - 1, item=self.open)
        else:
            call = self.calls[event[1]]
            call["arguments"] += event[2]
            self._emit("response.function_call_arguments.delta", item_id=call["id"],
                       output_index=self.items.index(call), delta=event[2])

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the last item with ``status``; a response with no item at all gets an empty message."""
        if not self.items:
            self._open_message()
        self._close(status)
        return self.items

    def _open_message(self) -> None:
        self._close("completed")
        self.open = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                     "role": "assistant", "content": []}
        self.text = ""
        self.items.append(self.open)
        index = len(self.items) - 1
        self._emit("response.output_item.added", output_index=index, item=self.open)
        self._emit("response.content_part.added", item_id=self.open["id"], output_index=index, content_index=0,
                   part=_text_part(""))

    def _close(self, status: str) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = _text_part(self.text)
            item["content"] = [part]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=self.text, logprobs=[])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=part)
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index, item=item)


def _parser(job: ChatJob) -> Any:
    return job.tools.parser() if job.tools is not None else _Plain()


async def _collect(streams: list[RequestStream], tally: Tally) -> CompletionOutput:
    final = None
    async for _, out in merge(streams):
        final = out.outputs[0]
        tally.saw(0, len(final.token_ids), final.finish_reason)
    assert final is not None
    return final


async def _events(state: ServerState, resp: _Response, streams: list[RequestStream],
                  tally: Tally) -> AsyncIterator[str]:
    ev = _Events()
    yield ev("response.created", response=resp.body())
    yield ev("response.in_progress", response=resp.body())
    try:
        parser, output = _parser(resp.job), _Output(ev)
        sent, final = 0, None
        async for _, out in merge(streams):
            final = out.outputs[0]
            tally.saw(0, len(final.token_ids), final.finish_reason)
            for e in parser.feed(final.text[sent:]):  # text that may open a tool call waits in the parser
                output.apply(e)
            sent = len(final.text)
            for line in output.take():
                yield line
        assert final is not None
        for e in parser.finish():
            output.apply(e)
        resp.finish(final, tally)
        resp.output = output.finish(resp.item_status)
        for line in output.take():
            yield line
        yield ev("response.incomplete" if resp.status == "incomplete" else "response.completed",
                 response=resp.body())
    except APIError as e:
        yield ev("error", code=e.code, message=e.message, param=e.param)
    except Exception:  # a bug: the status line is already sent, so say it in the stream
        log.exception("error while streaming %s", resp.id)
        yield ev("error", code="server_error", message="internal server error while streaming (logged)", param=None)
    finally:
        tally.record(state, 1)


# --- the route -------------------------------------------------------------------------------------------------


async def create_response(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    req = await parse_body(request, ResponsesRequest)
    job = await prepare_response(state, req)
    resp = _Response(req, job)
    tally = Tally(len(job.prompt))
    streams = await start(state, [job.prompt], job.params, resp.id, job.lora)
    if req.stream:
        return _EventStream(_events(state, resp, streams, tally), streams)
    try:
        final = await unless_disconnected(request, _collect(streams, tally))
    except ClientGone:
        tally.record(state, 1)
        return Response(status_code=499)  # nobody reads it
    tally.record(state, 1)
    parser, output = _parser(job), _Output()
    for e in parser.feed(final.text) + parser.finish():
        output.apply(e)
    resp.finish(final, tally)
    resp.output = output.finish(resp.item_status)
    return JSONResponse(resp.body())
