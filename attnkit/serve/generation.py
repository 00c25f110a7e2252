"""What /v1/completions and /v1/chat/completions share: sampling settings, prompt checks, running the
engine requests of one HTTP request, merging their streams, and noticing a client that went away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from ..engine.async_engine import EngineDrainingError, QueueFullError, RequestStream
from ..engine.data_parallel import ReplicaDiedError
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from .errors import APIError, bad_request
from .protocol import _Sampling

if TYPE_CHECKING:
    from .state import ServerState

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) response was ready."""


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, vocab_size: int,
                    structured: StructuredOutputs | None = None) -> SamplingParams:
    """The request's settings as SamplingParams (``structured``: its output constraint, from
    :func:`attnkit.serve.structured.checked_structured`); a bad value is a 400 naming the field."""
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        if not (k.isascii() and k.isdigit() and len(k) <= 12):
            raise bad_request(f"logit_bias: keys must be token ids (decimal integers), got {k!r}", "logit_bias")
        bias[int(k)] = v
    try:
        params = SamplingParams(n=req.n, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                                logprobs=logprobs, logit_bias=bias, skip_special_tokens=req.skip_special_tokens,
                                structured=structured, kv_window=req.kv_window,
                                attention_sinks=req.attention_sinks, kv_budget=req.kv_budget,
                                kv_budget_stream=req.kv_budget_stream)
        params.check_vocab(vocab_size)
        return params
    except SamplingParamsError as e:
        name = str(e).removeprefix("SamplingParams.").split(":", 1)[0]
        raise bad_request(str(e).removeprefix("SamplingParams."), name) from None


def max_new_tokens(state: ServerState, prompt_lens: list[int], requested: int | None, param: str,
                   unbounded: bool = False) -> int:
    """Check the prompts fit the context; the default for ``requested=None`` is the rest of the context.
    ``unbounded``: the request drops K/V (kv_window, kv_budget), so prompt and completion may exceed the context;
    the default is then the context's length."""
    limit = state.max_model_len
    longest = max(prompt_lens)
    if unbounded:
        if requested is not None and requested < 1:
            raise bad_request(f"max_tokens must be at least 1, got {requested}", "max_tokens")
        return limit if requested is None else requested
    if longest >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens, but the prompt has {longest} "
                          "tokens. Please reduce the length of the prompt.", param, "context_length_exceeded")
    if requested is None:
        return limit - longest
    if requested < 1:
        raise bad_request(f"{'max_tokens' if param == 'prompt' else 'max_completion_tokens'} must be at least 1, "
                          f"got {requested}", "max_tokens")
    if longest + requested > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                          "Please reduce the length of the prompt or the completion.", "max_tokens",
                          "context_length_exceeded")
    return requested


def check_chars(state: ServerState, num_chars: int, param: str) -> None:
    """Refuse, without tokenising it, a text too long to fit the context however it is tokenised
    (no token is longer than ``state.max_token_chars`` characters; twice that bound, to be safe)."""
    if num_chars > 2 * state.max_token_chars * state.max_model_len:
        raise bad_request(f"This model's maximum context length is {state.max_model_len} tokens, but the prompt "
                          f"has {num_chars} characters, far more than fit. Please reduce the length of the prompt.",
                          param, "context_length_exceeded")


async def encode(state: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenise off the event loop (after :func:`check_chars`)."""
    check_chars(state, len(text), param)
    return await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens)


async def start(state: ServerState, prompts: list[list[int]], params: SamplingParams, rid: str,
                lora: str | None = None) -> list[RequestStream]:
    """Hand every prompt to the engine (for LoRA adapter ``lora``, if named); all are accepted or none is
    (a refusal closes the others)."""
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(prompts):
            streams.append(await state.engine.add_request(ids, params, f"{rid}-{i}", lora))
    except BaseException as e:
        for s in streams:
            s.close()
        if isinstance(e, EngineDrainingError):
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        if isinstance(e, ReplicaDiedError):
            raise replica_died(e) from None
        if isinstance(e, QueueFullError):
            raise APIError(503, f"the server is overloaded: {e}; retry later", "server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        if isinstance(e, ValueError):
            raise bad_request(str(e)) from None
        raise
    return streams


def replica_died(e: ReplicaDiedError) -> APIError:
    """503 naming the data-parallel replica that died (:mod:`attnkit.engine.data_parallel`)."""
    return APIError(503, str(e), "server_error", code="replica_died")


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come; closing it closes them all. A data-parallel
    replica that died is a 503 naming it."""
    async with aclosing(_merge(streams)) as items:
        try:
            async for item in items:
                yield item
        except ReplicaDiedError as e:
            raise replica_died(e) from None


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        async with streams[0] as s:
            async for out in s:
                yield 0, out
        return
    q: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
            q.put_nowait((i, None))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


@dataclass
class Tally:
    """Token counts and timings of one HTTP request, for its usage block and the metrics."""

    prompt_tokens: int
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: dict[int, int] = field(default_factory=dict)  # choice index -> tokens so far
    finish: dict[int, str | None] = field(default_factory=dict)

    def saw(self, index: int, num_tokens: int, finish_reason: str | None) -> None:
        if num_tokens and self.first_token is None:
            self.first_token = time.perf_counter()
        self.tokens[index] = num_tokens
        if finish_reason is not None:
            self.finish[index] = finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens.values())

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def record(self, state: ServerState, num_choices: int) -> None:
        reasons = [self.finish.get(i) for i in range(num_choices)]
        state.metrics.observe(self.arrival, self.first_token, time.perf_counter(), self.prompt_tokens,
                              self.completion_tokens, max(self.tokens.values(), default=0), reasons)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientGone()
    return task.result()
