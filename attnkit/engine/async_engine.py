"""AsyncLLMEngine: the engine behind an asyncio server (vLLM's ``AsyncLLMEngine`` idea).

One background task owns the :class:`LLMEngine`: it applies queued additions and aborts between
steps, runs each step in a worker thread (the event loop stays responsive during the forward), and
routes every request's outputs to its own ``asyncio.Queue``.

``await add_request(...)`` returns once the engine has accepted the request — or raises what the
engine raised (``ValueError`` for invalid input, :class:`QueueFullError` when the waiting queue is
full, :class:`EngineDrainingError` during shutdown) — so a server can answer with an error status
before it starts streaming. The returned :class:`RequestStream` yields cumulative
:class:`RequestOutput`; closing it early or cancelling the task that reads it (client disconnect)
aborts the request, which frees its KV blocks before the next step. ``generate`` wraps both.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .scheduler import QueueFullError
from .sequence import SequenceStatus

__all__ = ["AsyncLLMEngine", "EngineDrainingError", "EngineStats", "QueueFullError", "RequestStream"]


class EngineDrainingError(RuntimeError):
    """The engine is shutting down: it finishes the requests it has and takes no new ones."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken between steps (what a /metrics endpoint reports)."""

    running: int  # requests with a sequence in the running batch
    waiting: int  # requests accepted but not running (queued, or preempted)
    kv_blocks: int
    kv_blocks_used: int
    prefix_queries: int  # full prompt blocks looked up in the prefix cache
    prefix_hits: int
    preemptions: int
    aborted: int = 0  # requests stopped before finishing (their blocks freed at once)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks if self.kv_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class RequestStream:
    """The outputs of one accepted request; ``close()`` (or cancellation while waiting) aborts it."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id, self._engine, self._queue = request_id, engine, queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the reader is gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self._engine._queues.pop(self.request_id, None)
            raise item
        if item.finished:
            self.finished = True
            self._engine._queues.pop(self.request_id, None)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)
        self._engine._queues.pop(self.request_id, None)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.draining = False
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._adds: deque[tuple[str, str | list[int], SamplingParams | None, str | None, asyncio.Future[None]]] = deque()
        self._aborts: deque[str] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._num_aborted = 0
        self._stats = self._snapshot()

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None
        self._wake.set()

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None, lora: str | None = None) -> RequestStream:
        """Hand a request to the engine (``lora``: a loaded adapter's name); returns its stream once
        accepted, raises if it is refused."""
        if self.draining:
            raise EngineDrainingError("the server is shutting down and accepts no new requests")
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._adds.append((rid, prompt, params, lora, accepted))
        self._ensure_loop()
        try:
            await accepted
        except BaseException:  # refused, or the caller was cancelled while waiting
            self._queues.pop(rid, None)
            self.abort(rid)
            raise
        return RequestStream(self, rid, q)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id, lora)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request before the next step (a no-op for finished or unknown ones)."""
        self._aborts.append(request_id)
        self._ensure_loop()

    def stats(self) -> EngineStats:
        s = self._stats
        pending = sum(1 for *_, f in self._adds if not f.done())
        return EngineStats(s.running, s.waiting + pending, s.kv_blocks, s.kv_blocks_used, s.prefix_queries,
                           s.prefix_hits, s.preemptions, s.aborted)

    @property
    def num_unfinished_requests(self) -> int:
        return self._stats.running + self._stats.waiting + len(self._adds)

    async def drain(self, timeout: float | None = None, poll_s: float = 0.02) -> bool:
        """Refuse new requests, then wait for the accepted ones to finish; True when none is left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._adds or self.engine.has_unfinished_requests():
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def shutdown(self) -> None:
        """Stop the background task (after :meth:`drain`, or to abandon what is left)."""
        self.draining = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for q in self._queues.values():
            q.put_nowait(EngineDrainingError("the engine was shut down"))

    def _snapshot(self) -> EngineStats:
        e = self.engine
        b = e.block_manager.stats()
        running = sum(1 for r in e.requests.values() if any(s.status is SequenceStatus.RUNNING for s in r.seqs))
        return EngineStats(running, len(e.requests) - running, b.num_blocks, b.used_blocks, b.prefix_queries,
                           b.prefix_hits, e.scheduler.num_preemptions, self._num_aborted)

    def _apply_adds_and_aborts(self) -> None:
        while self._adds:
            rid, prompt, params, lora, accepted = self._adds.popleft()
            if accepted.done():  # its caller gave up waiting
                continue
            try:
                self.engine.add_request(prompt, params, rid, lora)
            except Exception as e:  # an invalid request fails alone, in its caller
                accepted.set_exception(e)
            else:
                accepted.set_result(None)
        while self._aborts:
            if self.engine.abort_request(self._aborts.popleft()) is not None:
                self._num_aborted += 1
        self._stats = self._snapshot()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._apply_adds_and_aborts()
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
                self._stats = self._snapshot()
                continue
            self._stats = self._snapshot()
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
