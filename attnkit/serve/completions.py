"""POST /v1/completions: text (or token-id) prompts continued by the engine (OpenAI's legacy API).

``prompt`` is a string, a list of strings, a list of token ids or a list of those; choice
``i * n + j`` is completion j of prompt i. ``logprobs: k`` returns the sampled tokens' log-probabilities
and the top k alternatives in the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``). ``echo: true`` puts the prompt before each completion and, with ``logprobs``, the
prompt tokens' log-probabilities before the completion's (None for the first token) — what evaluation
harnesses use to score a text (the engine's ``SamplingParams.prompt_logprobs``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from ..engine.outputs import CompletionOutput, RequestOutput
from .errors import bad_request, parse_body
from .generation import Tally, encode, max_new_tokens, sampling_params, start
from .protocol import CompletionRequest
from .structured import checked_structured
from .formatting import Format, respond

if TYPE_CHECKING:
    from .state import ServerState


class CompletionFormat(Format):
    def __init__(self, *a: Any, echo: list[tuple[str, list[int]]] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.offsets: dict[int, int] = {}
        self.echo = echo  # per prompt: (its text, its token ids)
        self.prompt_lps: dict[int, list[dict[int, float] | None]] = {}
        self.echoed: set[int] = set()

    def request_output(self, prompt_index: int, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_lps[prompt_index] = out.prompt_logprobs

    def _lp_entry(self, lp: dict[str, list[Any]], index: int, tid: int, d: dict[int, float] | None) -> None:
        s = self.token(tid)
        lp["tokens"].append(s)
        lp["token_logprobs"].append(None if d is None else d.get(tid))
        best = [] if d is None else sorted(d.items(), key=lambda kv: -kv[1])[: self.top]
        lp["top_logprobs"].append({self.token(t): v for t, v in best} if self.top and d is not None else None)
        lp["text_offset"].append(self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + len(s)

    def logprobs(self, index: int, out: CompletionOutput, start: int) -> dict[str, Any] | None:
        if self.top is None or out.logprobs is None:
            return None
        lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if self.echo is not None and index not in self.echoed:  # the prompt's tokens come first
            i = index // self.n
            prompt = self.echo[i][1]
            lps = self.prompt_lps.get(i) or [None] * len(prompt)
            for tid, d in zip(prompt, lps):
                self._lp_entry(lp, index, tid, d)
        for tid, d in zip(out.token_ids[start:], out.logprobs[start:]):
            self._lp_entry(lp, index, tid, d)
        return lp

    def _text(self, index: int, text: str) -> str:
        if self.echo is None or index in self.echoed:
            return text
        return self.echo[index // self.n][0] + text

    def choice(self, index: int, out: CompletionOutput) -> dict[str, Any]:
        text, lps = self._text(index, out.text), self.logprobs(index, out, 0)
        self.echoed.add(index)
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": out.finish_reason}

    def delta(self, index: int, text: str, out: CompletionOutput, start: int) -> dict[str, Any]:
        text, lps = self._text(index, text), self.logprobs(index, out, start)
        self.echoed.add(index)
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": out.finish_reason}


async def _prompt_ids(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > 256:
        raise bad_request(f"prompt has {len(prompts)} prompts; at most 256 per request", "prompt")
    ids = [await encode(state, p, "prompt") if isinstance(p, str) else list(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise bad_request(f"prompt {i} is empty (it needs at least one token)", "prompt")
        if any(not 0 <= t < state.vocab_size for t in p):
            raise bad_request(f"prompt {i} has token ids outside [0, {state.vocab_size})", "prompt")
    return ids


async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    req = await parse_body(request, CompletionRequest)
    model, lora = state.check_model(req.model)
    prompts = await _prompt_ids(state, req.prompt)
    tally = Tally(sum(len(p) for p in prompts))
    params = sampling_params(req, max_new_tokens(state, [len(p) for p in prompts], req.max_tokens, "prompt",
                                                   req.kv_window is not None or req.kv_budget is not None),
                             req.logprobs, state.vocab_size, await checked_structured(state, req))
    echo = None
    if req.echo:
        texts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) else None
        if isinstance(req.prompt, str):
            texts = [req.prompt]
        echo = [(texts[i] if texts else state.tokenizer.decode(p, skip_special_tokens=False), p)
                for i, p in enumerate(prompts)]
        if req.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    fmt = CompletionFormat(state, model, req.n, req.logprobs, echo=echo)
    streams = await start(state, prompts, params, fmt.id, lora)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(request, fmt, streams, tally, req.stream, include_usage)
