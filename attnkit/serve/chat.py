"""POST /v1/chat/completions: system/user/assistant messages through the model's chat template.

The conversation is rendered with the model's own Jinja template (sandboxed, :mod:`attnkit.text.chat_template`)
and ``add_generation_prompt``, exactly as :meth:`attnkit.engine.LLM.chat` does, so a greedy reply here
equals the offline one. OpenAI's ``developer`` role is passed to the template as ``system``.
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
from .formatting import Format, respond

if TYPE_CHECKING:
    from .state import ServerState


class ChatFormat(Format):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

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
        return {"index": index, "message": {"role": "assistant", "content": out.text, "refusal": None},
                "logprobs": self.logprobs(out, 0), "finish_reason": out.finish_reason}

    def first_chunks(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def delta(self, index: int, text: str, out: CompletionOutput, start: int) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": self.logprobs(out, start),
                "finish_reason": out.finish_reason}


def _render(state: ServerState, req: ChatCompletionRequest) -> str:
    tok = state.tokenizer
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
    try:
        text = render_chat(tok.chat_template, messages, add_generation_prompt=True, source=state.model_name,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
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


async def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> ChatJob:
    """Render, tokenise and check ``req``: any problem is a 400 naming the field before anything runs."""
    model, lora = state.check_model(req.model)
    check_chars(state, sum(len(m.text) for m in req.messages), "messages")
    prompt = await encode(state, await asyncio.to_thread(_render, state, req), "messages", add_special_tokens=False)
    if not prompt:
        raise bad_request("the rendered conversation is empty", "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = max_new_tokens(state, [len(prompt)], req.max_new_tokens, "messages")
    params = sampling_params(req, max_tokens, top, state.vocab_size)
    return ChatJob(model, lora, prompt, params, top)


async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    req = await parse_body(request, ChatCompletionRequest)
    job = await prepare_chat(state, req)
    tally = Tally(len(job.prompt))
    fmt = ChatFormat(state, job.model, req.n, job.top_logprobs)
    streams = await start(state, [job.prompt], job.params, fmt.id, job.lora)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(request, fmt, streams, tally, req.stream, include_usage)
