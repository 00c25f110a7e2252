"""AsyncLLMEngine: the engine behind an asyncio server (vLLM's ``AsyncLLMEngine`` idea).

One background task owns the :class:`LLMEngine`: it applies queued additions and aborts between
steps, runs each step in a worker thread (the event loop stays responsive during the forward), and
routes every request's outputs to its own ``asyncio.Queue``. ``generate`` is an async iterator of
cumulative :class:`RequestOutput`; leaving it early (client disconnect, cancellation) aborts the
request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._adds: list[tuple[str, str | list[int], SamplingParams | None]] = []
        self._aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None
        self._wake.set()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        self._adds.append((rid, prompt, params))
        self._ensure_loop()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._ensure_loop()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            while self._adds:
                rid, prompt, params = self._adds.pop(0)
                try:
                    self.engine.add_request(prompt, params, rid)
                except Exception as e:  # an invalid request fails alone, in its caller
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(e)
            while self._aborts:
                self.engine.abort_request(self._aborts.pop(0))
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # pragma: no cover - a bug: fail every waiting request, not silently
                for q in self._queues.values():
                    q.put_nowait(e)
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                continue
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
