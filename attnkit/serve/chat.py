"""POST /v1/chat/completions: system/user/assistant messages through the model's chat template.

The conversation is rendered with the model's own Jinja template (sandboxed, :mod:`attnkit.text.chat_template`)
and ``add_generation_prompt``, exactly as :meth:`attnkit.engine.LLM.chat` does, so a greedy reply here
equals the offline one. OpenAI's ``developer`` role is passed to the template as ``system``.
Tool calling (``tools``, ``tool_choice``, ``tool`` messages) is :mod:`attnkit.serve.tools`'.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from ..engine.outputs import CompletionOutput
from ..engine.sampling_params import SamplingParams
from ..text.chat_template import ChatTemplateError, render_chat
from .errors import bad_request, parse_body
from .generation import Tally, check_chars, encode, max_new_tokens, sampling_params, start
from .protocol import ChatCompletionRequest
from .structured import checked_structured, compile_checked
from .formatting import Format, respond
from .tools import ToolSetup, call_id, render_inputs, setup_tools

if TYPE_CHECKING:
    from .state import ServerState


class ChatFormat(Format):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, model: str, n: int, logprobs: int | None,
                 tools: ToolSetup | None = None) -> None:
        super().__init__(state, model, n, logprobs)
        self.tools = tools
        self.parsers: dict[int, Any] = {}  # choice index -> its streaming tool-call parser
        self.called: set[int] = set()  # choices that have streamed a tool call

    def _entry(self, tid: int, lp: float) -> dict[str, Any]:
        s = self.token(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    def logprobs(self, out: CompletionOutput, start: int) -> dict[str, Any] | None:
        if self.top is None or out.logprobs is None:
            return None
        content = []
        for tid, d in zip(out.token_ids[start:], out.logprobs[start:]):
            best = sorted(d.items(), key=lambda kv: -kv[1])[: self.top]
            content.append({**self._entry(tid, d[tid]), "top_logprobs": [self._entry(t, v) for t, v in best]})
        return {"content": content, "refusal": None}

    def choice(self, index: int, out: CompletionOutput) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": out.text, "refusal": None}
        reason = out.finish_reason
        if self.tools is not None:
            message["content"], calls = self.tools.parse(out.text)
            if calls:
                message["tool_calls"] = calls
            reason = ToolSetup.finish_reason(reason, bool(calls))
        return {"index": index, "message": message, "logprobs": self.logprobs(out, 0), "finish_reason": reason}

    def first_chunks(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def delta(self, index: int, text: str, out: CompletionOutput, start: int) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": self.logprobs(out, start),
                "finish_reason": out.finish_reason}

    def deltas(self, index: int, text: str, out: CompletionOutput, start: int) -> list[dict[str, Any]]:
        """With tools, the parser's content and OpenAI tool-call deltas (the first of a call: index, id, type,
        name and empty arguments; then argument fragments); text that may open a call waits."""
        if self.tools is None:
            return super().deltas(index, text, out, start)
        if index not in self.parsers:
            self.parsers[index] = self.tools.parser()
        parser = self.parsers[index]
        events = parser.feed(text) + (parser.finish() if out.finish_reason is not None else [])
        chunks = []
        for e in events:
            if e[0] == "content":
                delta: dict[str, Any] = {"content": e[1]}
            elif e[0] == "call":
                self.called.add(index)
                delta = {"tool_calls": [{"index": e[1], "id": call_id(), "type": "function",
                                         "function": {"name": e[2], "arguments": ""}}]}
            else:
                delta = {"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]}
            chunks.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
        if out.finish_reason is not None:
            chunks = chunks or [{"index": index, "delta": {}, "logprobs": None, "finish_reason": None}]
            chunks[-1]["finish_reason"] = ToolSetup.finish_reason(out.finish_reason, index in self.called)
        if chunks:
            chunks[0]["logprobs"] = self.logprobs(out, start)
        return chunks


def _render(state: ServerState, req: ChatCompletionRequest, tools: ToolSetup | None = None) -> str:
    tok = state.tokenizer
    messages, variables = render_inputs(req, tok.chat_template, tools)
    try:
        text = render_chat(tok.chat_template, messages, add_generation_prompt=True, source=state.model_name,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "", **variables)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None
    return text


@dataclass
class ChatJob:
    """A validated chat request, ready for the engine: what /v1/chat/completions and /v1/responses share."""

    model: str  # the name to answer with
    lora: str | None
    prompt: list[int]
    params: SamplingParams
    top_logprobs: int | None
    tools: ToolSetup | None = None  # tool calling: its parser reads the output (``tools.parse(text)``)


async def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> ChatJob:
    """Render, tokenise and check ``req``: any problem is a 400 naming the field before anything runs."""
    model, lora = state.check_model(req.model)
    tools = setup_tools(req, state.tokenizer.chat_template)
    check_chars(state, sum(len(m.text) for m in req.messages), "messages")
    prompt = await encode(state, await asyncio.to_thread(_render, state, req, tools), "messages",
                          add_special_tokens=False)
    if not prompt:
        raise bad_request("the rendered conversation is empty", "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = max_new_tokens(state, [len(prompt)], req.max_new_tokens, "messages",
                                req.kv_window is not None or req.kv_budget is not None)
    structured = await checked_structured(state, req)
    if tools is not None and tools.structured is not None:
        if structured is not None:  # two grammars for one output: refused, not one silently dropped
            raise bad_request(f"tool_choice {req.tool_choice if isinstance(req.tool_choice, str) else 'naming a function'}"
                              " forces a tool call's grammar; it cannot be combined with a structured-output "
                              "constraint (response_format json_object/json_schema or guided_*)", "tool_choice")
        await compile_checked(state, tools.structured, "tools")
        structured = tools.structured
    params = sampling_params(req, max_tokens, top, state.vocab_size, structured)
    return ChatJob(model, lora, prompt, params, top, tools)


async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    req = await parse_body(request, ChatCompletionRequest)
    job = await prepare_chat(state, req)
    tally = Tally(len(job.prompt))
    fmt = ChatFormat(state, job.model, req.n, job.top_logprobs, job.tools)
    streams = await start(state, [job.prompt], job.params, fmt.id, job.lora)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(request, fmt, streams, tally, req.stream, include_usage)
