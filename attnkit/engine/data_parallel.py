"""DataParallelEngine: N engine replicas, each in its own process, behind one server (vLLM's and SGLang's
data-parallel router).

It offers :class:`AsyncLLMEngine`'s interface (``add_request``, ``generate``, ``abort``, ``stats``, ``drain``,
``shutdown``, ``draining``, ``engine``), so the server's handlers do not change. Each replica
(:mod:`attnkit.engine.dp_replica`) builds its own engine with ``factory`` (LoRA adapters included) on
``threads`` torch threads; requests and outputs cross the pipes as plain dicts.

Routing — prefix-cache affinity, then load: the first ``affinity_blocks`` full blocks of the prompt's token ids
(with the LoRA adapter) are hashed block by block; a request goes to the replica that last served its longest
such prefix when that replica's load (unfinished requests) is at most ``affinity_margin`` above the least-loaded
replica's, else to the least-loaded replica (ties: the one given fewer requests so far). ``routed`` records the
replica of each request id.

A replica that dies fails its in-flight requests with :class:`ReplicaDiedError` naming it (the server answers
503); the others keep serving, and new requests go to them.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.multiprocessing as mp

from .async_engine import AsyncLLMEngine, EngineDrainingError, EngineStats, RequestStream
from .dp_replica import output_from_wire, params_to_wire, replica_main
from .sampling_params import SamplingParams
from .scheduler import QueueFullError
from .speculative import SpecStats

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer
    from .grammar import Grammars
    from .llm_engine import LLMEngine

__all__ = ["DataParallelEngine", "ReplicaDiedError", "ReplicaInfo", "load_tokenizer"]

_ZERO = EngineStats(0, 0, 0, 0, 0, 0, 0, 0)


class ReplicaDiedError(RuntimeError):
    """A data-parallel replica process exited: its requests are lost (the others keep serving)."""


def load_tokenizer(path: str | Path | None) -> tuple[Tokenizer, Path]:
    """The tokenizer of a GGUF file or HF directory (None: the embedded default model), without its weights:
    what the server process needs while the replicas hold the model."""
    from ..loading import ModelLoadError
    from ..loading.defaults import default_chat_model
    from ..loading.gguf_file import GGUFFile
    from ..text.tokenizer import Tokenizer

    path = default_chat_model() if path is None else Path(path)
    if path.is_file():
        return Tokenizer.from_gguf(GGUFFile(path).metadata, path), path
    if (path / "config.json").is_file():
        return Tokenizer.from_dir(path), path
    raise ModelLoadError(path, "no such file or directory" if not path.exists() else
                         "not a GGUF file nor a Hugging Face directory with config.json")


class _SpecSum:
    """The replicas' speculative-decoding counters summed: what /metrics reads as ``engine.spec.stats``."""

    def __init__(self, replicas: list[_Replica]) -> None:
        self.replicas = replicas

    @property
    def stats(self) -> SpecStats:
        parts = [r.spec for r in self.replicas if r.spec is not None]
        return SpecStats(**{f: sum(p[f] for p in parts) for f in SpecStats.__dataclass_fields__})


class ReplicaInfo:
    """What the server's handlers read of ``state.engine.engine``: the facts all replicas share, the tokenizer
    (loaded in the server), the grammar compiler that checks structured-output requests before routing, and the
    replicas' speculative-decoding counters summed (``spec``; None without speculative decoding)."""

    def __init__(self, tokenizer: Tokenizer, ready: dict[str, Any], replicas: list[_Replica]) -> None:
        self.tokenizer = tokenizer
        self.spec = _SpecSum(replicas) if ready["spec"] else None
        self.max_model_len, self.vocab_size = ready["max_model_len"], ready["vocab_size"]
        self.eos_ids, self.block_size, self._loras = set(ready["eos_ids"]), ready["block_size"], ready["loras"]
        self._grammars: Grammars | None = None
        self._lock = threading.Lock()

    def lora_names(self) -> list[str]:
        return list(self._loras)

    @property
    def grammars(self) -> Grammars:
        from .grammar import Grammars

        with self._lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars


@dataclass
class _Replica:
    index: int
    process: Any
    conn: Any
    outbox: queue.Queue = field(default_factory=queue.Queue)
    load: int = 0  # unfinished requests routed here
    assigned: int = 0
    stats: EngineStats = _ZERO
    spec: dict[str, int] | None = None  # its SpecStats fields
    dead: str | None = None  # why it is gone
    tensor_parallel: int = 1  # ranks of its tensor-parallel group (1: the replica alone)

    def send(self, msg: dict[str, Any] | None) -> None:
        self.outbox.put(msg)

    def write(self) -> None:  # the writer thread: the event loop never blocks on a full pipe
        while (msg := self.outbox.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):  # it died: its reader says so
                return


@dataclass
class _Pending:
    replica: _Replica
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future
    acked: bool = False  # the replica accepted it (set by the reader thread: the future settles later, on the loop)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        fut.set_exception(error) if error is not None else fut.set_result(None)


class DataParallelEngine:
    def __init__(self, factory: Callable[[], LLMEngine], size: int, tokenizer: Tokenizer, *,
                 threads: int | None = None, affinity_blocks: int = 4, affinity_margin: int = 4,
                 start_timeout: float = 600.0, close: Callable[[LLMEngine], None] | None = None) -> None:
        """Start ``size`` replicas, each running ``factory()`` (a picklable callable) on ``threads`` torch threads
        (default: this machine's cores // size, at least 1); returns once all are ready. ``close`` (picklable): what
        a replica runs on its engine as it stops, for engines that start processes of their own (a replica that
        is rank 0 of a tensor-parallel group); such replicas are not daemons (a daemon may not start processes),
        so :meth:`close` runs at this process's exit too."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"data-parallel size must be an integer >= 1, got {size!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads per replica must be >= 1, got {threads}")
        if affinity_blocks < 0 or affinity_margin < 0:
            raise ValueError("affinity_blocks and affinity_margin must be >= 0")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads or max(1, cores // size)
        self.affinity_blocks, self.affinity_margin = affinity_blocks, affinity_margin
        self.draining = False
        self.routed: OrderedDict[str, int] = OrderedDict()  # request id -> replica (the latest 10,000)
        self._prefix: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica that last served it
        self._requests: dict[str, _Pending] = {}
        self._queues: dict[str, asyncio.Queue] = {}  # RequestStream's view
        self._lock = threading.Lock()
        self._ids = itertools.count()
        ctx = mp.get_context("spawn")
        self.replicas: list[_Replica] = []
        for i in range(size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=replica_main, args=(i, theirs, factory, self.threads, close), daemon=close is None,
                            name=f"attnkit-dp-replica-{i}")
            p.start()
            theirs.close()  # so that its death reads as EOF here
            self.replicas.append(_Replica(i, p, ours))
        try:
            ready = [self._wait_ready(r, start_timeout) for r in self.replicas]
        except BaseException:
            self._kill()
            raise
        for r, info in zip(self.replicas, ready):
            r.tensor_parallel = info.get("tensor_parallel", 1)
            for key in ("max_model_len", "vocab_size", "eos_ids", "block_size", "loras", "spec"):
                if info[key] != ready[0][key]:
                    self._kill()
                    raise ValueError(f"data-parallel replicas disagree on {key}: replica 0 has {ready[0][key]!r}, "
                                     f"replica {r.index} has {info[key]!r}")
        self.engine = ReplicaInfo(tokenizer, ready[0], self.replicas)
        if close is not None:  # before multiprocessing's own exit handler, which would wait for them
            atexit.register(self.close)
        for r in self.replicas:
            threading.Thread(target=r.write, daemon=True, name=f"dp-write-{r.index}").start()
            threading.Thread(target=self._read, args=(r,), daemon=True, name=f"dp-read-{r.index}").start()

    @staticmethod
    def _wait_ready(r: _Replica, timeout: float) -> dict[str, Any]:
        try:
            if not r.conn.poll(timeout):
                raise RuntimeError(f"data-parallel replica {r.index} did not start within {timeout:.0f} s")
            msg = r.conn.recv()
        except EOFError:
            r.process.join(5)
            raise RuntimeError(f"data-parallel replica {r.index} (pid {r.process.pid}) exited with code "
                               f"{r.process.exitcode} while starting") from None
        if msg["op"] == "error":  # its factory raised: a bad model, adapter or option (the CLI's one-line error)
            raise ValueError(f"data-parallel replica {r.index} failed to start: {msg['message']}")
        return msg

    # routing
    def _prefix_keys(self, ids: list[int], lora: str | None) -> list[int]:
        bs, keys, h = self.engine.block_size, [], hash(lora)
        for k in range(min(self.affinity_blocks, len(ids) // bs)):
            h = hash((h, tuple(ids[k * bs:(k + 1) * bs])))
            keys.append(h)
        return keys

    def _route(self, rid: str, ids: list[int], lora: str | None) -> _Replica:
        """Pick the replica (under the lock) and count the request on it."""
        alive = [r for r in self.replicas if r.dead is None]
        if not alive:
            raise ReplicaDiedError("no data-parallel replica is alive: "
                                   + "; ".join(f"replica {r.index}: {r.dead}" for r in self.replicas))
        choice = min(alive, key=lambda r: (r.load, r.assigned))
        keys = self._prefix_keys(ids, lora)
        for key in reversed(keys):  # the longest prefix seen before
            if (i := self._prefix.get(key)) is not None:
                r = self.replicas[i]
                if r.dead is None and r.load <= choice.load + self.affinity_margin:
                    choice = r
                break
        for key in keys:
            self._prefix[key] = choice.index
            self._prefix.move_to_end(key)
        while len(self._prefix) > 100_000:
            self._prefix.popitem(last=False)
        choice.load += 1
        choice.assigned += 1
        self.routed[rid] = choice.index
        if len(self.routed) > 10_000:
            self.routed.popitem(last=False)
        return choice

    def _forget(self, rid: str) -> _Pending | None:
        """Drop a request from the books (under the lock); its replica's load falls by one."""
        entry = self._requests.pop(rid, None)
        if entry is not None:
            entry.replica.load -= 1
        return entry

    # AsyncLLMEngine's interface
    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None, lora: str | None = None) -> RequestStream:
        """Route a request to a replica; returns its stream once that replica accepted it, raises if refused."""
        if self.draining:
            raise EngineDrainingError("the server is shutting down and accepts no new requests")
        rid = request_id if request_id is not None else f"dp-{next(self._ids)}"
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        loop = asyncio.get_running_loop()
        with self._lock:
            if rid in self._requests or rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in use")
            replica = self._route(rid, ids, lora)
            entry = _Pending(replica, loop, asyncio.Queue(), loop.create_future())
            self._requests[rid] = entry
            self._queues[rid] = entry.queue
        replica.send({"op": "add", "id": rid, "prompt": prompt if isinstance(prompt, str) else ids,
                      "params": params_to_wire(params) if params is not None else None, "lora": lora})
        try:
            await entry.accepted
        except BaseException:
            self._queues.pop(rid, None)
            self.abort(rid)
            raise
        return RequestStream(self, rid, entry.queue)  # type: ignore[arg-type]

    generate = AsyncLLMEngine.generate  # add_request, then the stream's outputs: the same for the router

    def abort(self, request_id: str) -> None:
        """Abort a request on its replica (a no-op for finished or unknown ones)."""
        with self._lock:
            entry = self._forget(request_id)
        if entry is not None:
            entry.replica.send({"op": "abort", "id": request_id})

    def stats(self) -> EngineStats:
        """The replicas' latest snapshots summed (requests not yet accepted count as waiting)."""
        with self._lock:
            pending = sum(1 for e in self._requests.values() if not e.acked)
            parts = [r.stats for r in self.replicas]
        total = EngineStats(*(sum(getattr(s, f) for s in parts) for f in EngineStats.__dataclass_fields__))
        return replace(total, waiting=total.waiting + pending)

    def replica_stats(self) -> list[EngineStats]:
        return [r.stats for r in self.replicas]

    @property
    def num_unfinished_requests(self) -> int:
        return sum(r.load for r in self.replicas)

    async def drain(self, timeout: float | None = None, poll_s: float = 0.02) -> bool:
        """Refuse new requests, then wait for the accepted ones to finish; True when none is left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._requests:
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def shutdown(self) -> None:
        """Stop every replica (after :meth:`drain`, or abandoning what is left)."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """:meth:`shutdown` without an event loop: stop the replicas, fail what is left."""
        self.draining = True
        for r in self.replicas:
            r.send({"op": "stop"})
            r.send(None)
        for r in self.replicas:
            r.process.join(10)
        self._kill()
        with self._lock:
            left = [self._forget(rid) for rid in list(self._requests)]
        for entry in left:
            self._fail(entry, EngineDrainingError("the engine was shut down"))

    def _kill(self) -> None:
        for r in self.replicas:
            if r.process.is_alive():
                r.process.kill()
                r.process.join(5)

    # replies from the replicas (one reader thread each)
    def _fail(self, entry: _Pending, error: BaseException) -> None:
        if entry.acked:
            entry.loop.call_soon_threadsafe(entry.queue.put_nowait, error)
        else:
            entry.loop.call_soon_threadsafe(_settle, entry.accepted, error)

    def _read(self, r: _Replica) -> None:
        while True:
            try:
                msg = r.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                r.spec = msg["stats"].pop("spec")
                r.stats = EngineStats(**msg["stats"])
            if msg["op"] == "replies":
                for rep in msg["replies"]:
                    self._reply(rep)
            elif msg["op"] == "outputs":
                for d in msg["outputs"]:
                    with self._lock:
                        entry = self._forget(d["request_id"]) if d["finished"] else self._requests.get(d["request_id"])
                    if entry is not None:
                        entry.loop.call_soon_threadsafe(entry.queue.put_nowait, output_from_wire(d))
            elif msg["op"] == "failed":
                for rid in msg["ids"]:
                    with self._lock:
                        entry = self._forget(rid)
                    if entry is not None:
                        self._fail(entry, RuntimeError(f"data-parallel replica {r.index} failed: {msg['message']}"))
        self._died(r)

    def _reply(self, rep: dict[str, Any]) -> None:
        with self._lock:
            entry = self._requests.get(rep["id"]) if rep["op"] == "accepted" else self._forget(rep["id"])
            if entry is None:
                return
            entry.acked = rep["op"] == "accepted"
        error = None
        if rep["op"] == "refused":
            kind = {"queue_full": QueueFullError, "invalid": ValueError}.get(rep["kind"], RuntimeError)
            error = kind(rep["message"])
        entry.loop.call_soon_threadsafe(_settle, entry.accepted, error)

    def _died(self, r: _Replica) -> None:
        r.process.join(1)
        code = r.process.exitcode
        why = "was stopped" if self.draining else f"exited with code {code}" if code is not None else "closed its pipe"
        with self._lock:
            r.dead = f"pid {r.process.pid} {why}"
            s = r.stats  # its counters stay; nothing of it runs or holds blocks any more
            r.stats = replace(s, running=0, waiting=0, kv_blocks=0, kv_blocks_used=0)
            lost = [self._forget(rid) for rid, e in list(self._requests.items()) if e.replica is r]
        r.send(None)
        error = ReplicaDiedError(f"data-parallel replica {r.index} (pid {r.process.pid}) {why}; its in-flight "
                                 f"requests are lost (the other replicas keep serving)")
        for entry in lost:
            if entry is not None:
                self._fail(entry, error)
