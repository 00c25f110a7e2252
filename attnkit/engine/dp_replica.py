"""One data-parallel replica: an :class:`LLMEngine` step loop in its own process, driven over a pipe by
:class:`attnkit.engine.data_parallel.DataParallelEngine` (vLLM's DP engine core, SGLang's DP worker).

The pipe carries control messages only: plain dicts of builtins (str, int, float, list, dict), never a
tensor or an object. Server → replica: ``{"op": "add", "id", "prompt", "params", "lora"}``,
``{"op": "abort", "id"}``, ``{"op": "stop"}``. Replica → server: ``{"op": "ready", ...facts}`` or
``{"op": "error", "message"}`` once at start-up; then ``{"op": "replies", "replies": [...], "stats"}`` after
each batch of messages (``accepted`` / ``refused`` per add) and ``{"op": "outputs", "outputs": [...], "stats"}``
after each step. The replica exits on ``stop`` or when the server's end of the pipe closes.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from .async_engine import EngineStats
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, StructuredOutputs
from .scheduler import QueueFullError
from .sequence import SequenceStatus


def params_to_wire(p: SamplingParams) -> dict[str, Any]:
    d = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}
    if p.structured is not None:
        d["structured"] = {f.name: getattr(p.structured, f.name) for f in dataclasses.fields(p.structured)}
    return d


def params_from_wire(d: dict[str, Any] | None) -> SamplingParams | None:
    if d is None:
        return None
    s = d.get("structured")
    return SamplingParams(**{**d, "structured": StructuredOutputs(**s) if s is not None else None})


def output_to_wire(o: RequestOutput) -> dict[str, Any]:
    """Shallow dicts (``dataclasses.asdict`` deep-copies: 20x slower); the pipe pickles them at once."""
    return {**vars(o), "outputs": [dict(vars(c)) for c in o.outputs], "metrics": dict(vars(o.metrics))}


def output_from_wire(d: dict[str, Any]) -> RequestOutput:
    return RequestOutput(**{**d, "outputs": [CompletionOutput(**c) for c in d["outputs"]],
                            "metrics": RequestMetrics(**d["metrics"])})


def engine_stats(engine: LLMEngine, aborted: int) -> dict[str, Any]:
    """The replica's :class:`EngineStats` as a dict (the same reading as ``AsyncLLMEngine._snapshot``), with its
    speculative-decoding counters (``spec``: :class:`SpecStats` fields, or None)."""
    b = engine.block_manager.stats()
    running = sum(1 for r in engine.requests.values() if any(s.status is SequenceStatus.RUNNING for s in r.seqs))
    stats = EngineStats(running, len(engine.requests) - running, b.num_blocks, b.used_blocks, b.prefix_queries,
                        b.prefix_hits, engine.scheduler.num_preemptions, aborted)
    return {**vars(stats), "spec": vars(engine.spec.stats) if engine.spec is not None else None}


def _error_kind(e: Exception) -> str:
    return "queue_full" if isinstance(e, QueueFullError) else "invalid" if isinstance(e, (ValueError, TypeError)) \
        else "error"


def replica_main(index: int, conn: Connection, factory: Callable[[], LLMEngine], threads: int,
                 close: Callable[[LLMEngine], None] | None = None) -> None:
    """The replica process: build the engine with ``factory`` on ``threads`` torch threads, then serve the pipe;
    ``close(engine)`` as it stops (its tensor-parallel workers, if any)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server drains, then stops us
    torch.set_num_threads(threads)
    try:
        engine = factory()
        if not isinstance(engine, LLMEngine):
            raise TypeError(f"the replica factory returned {type(engine).__name__}, not an LLMEngine")
    except BaseException as e:  # a bad model path, a bad adapter: the server reports it and stops
        conn.send({"op": "error", "message": f"{type(e).__name__}: {e}"})
        return
    conn.send({"op": "ready", "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
               "eos_ids": sorted(engine.eos_ids), "block_size": engine.config.block_size,
               "loras": engine.lora_names(), "threads": torch.get_num_threads(),
               "spec": engine.spec is not None,
               "tensor_parallel": getattr(getattr(engine.runner, "tp", None), "world", 1)})
    try:
        _serve(engine, conn)
    finally:
        if close is not None:
            close(engine)


def _serve(engine: LLMEngine, conn: Connection) -> None:
    aborted = 0
    try:
        while True:
            if not engine.has_unfinished_requests() or conn.poll():
                msgs = [conn.recv()]  # blocks only while idle
                while conn.poll():
                    msgs.append(conn.recv())
                replies = []
                for msg in msgs:
                    if msg["op"] == "stop":
                        return
                    if msg["op"] == "abort":
                        aborted += engine.abort_request(msg["id"]) is not None
                        continue
                    try:
                        engine.add_request(msg["prompt"], params_from_wire(msg["params"]), msg["id"], msg["lora"])
                    except Exception as e:  # an invalid request fails alone
                        replies.append({"op": "refused", "id": msg["id"], "kind": _error_kind(e), "message": str(e)})
                    else:
                        replies.append({"op": "accepted", "id": msg["id"]})
                conn.send({"op": "replies", "replies": replies, "stats": engine_stats(engine, aborted)})
                continue
            try:
                outs = engine.step()
            except Exception as e:  # a bug: fail this replica's requests, loudly, and keep serving
                ids = list(engine.requests)
                for rid in ids:
                    engine.abort_request(rid)
                conn.send({"op": "failed", "ids": ids, "message": f"{type(e).__name__}: {e}",
                           "stats": engine_stats(engine, aborted)})
                continue
            conn.send({"op": "outputs", "outputs": [output_to_wire(o) for o in outs],
                       "stats": engine_stats(engine, aborted)})
    except (EOFError, OSError):  # the server is gone
        return
