"""The engine over tensor-parallel ranks: rank 0 schedules, every rank runs the same forward on its slice.

As vLLM's tensor-parallel executor: the scheduler, the block manager, sampling, detokenisation and the server
live on rank 0 only; each step rank 0 broadcasts what its :class:`~attnkit.engine.model_runner.ModelRunner` is
asked to do — the step's sequences (their new tokens, positions, block tables), its copy-on-write copies and
sink rotations — and every rank's own runner performs it on its own K/V pool (its KV heads' share of each
block) and its slice of the weights. The collectives inside the model (:mod:`attnkit.parallel.tensor`) keep
the ranks in step; logits arrive whole on every rank and only rank 0 samples.

Messages are JSON (a length, then the bytes) broadcast over the process group. While rank 0 has no work it
sends a heartbeat, so that a worker waiting for the next step tells a stopped rank 0 (an error within the
group's timeout) from an idle one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from ..engine.model_runner import ModelRunner
from ..engine.scheduler import ScheduledBatch
from .shm import PeerFailed
from .tensor import TensorParallel, TensorParallelError

#: the runner settings workers copy from rank 0's engine
_RUNNER_KEYS = ("num_blocks", "block_size", "kv_dtype", "batch_invariant", "free_window_kv", "compile", "tail_slots")


def broadcast_message(tp: TensorParallel, msg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0 sends ``msg`` (JSON) to every rank of ``tp``'s group; the others receive and return it."""
    if tp.shm is not None:  # ranks of one machine: through shared memory (gloo for a message larger than a slot)
        try:
            got = tp.shm.broadcast(json.dumps(msg, separators=(",", ":")).encode() if tp.rank == 0 else None)
        except PeerFailed as e:
            raise TensorParallelError(f"tensor-parallel rank {tp.rank}/{tp.world}: the step broadcast failed — "
                                      f"{e}") from e
        if got is not None:
            return msg if tp.rank == 0 else json.loads(got)  # type: ignore[return-value]
    try:
        if tp.rank == 0:
            data = json.dumps(msg, separators=(",", ":")).encode()
            size = torch.tensor([len(data)], dtype=torch.int64, device=tp.device)
            dist.broadcast(size, 0, group=tp.group)
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(tp.device), 0, group=tp.group)
            return msg  # type: ignore[return-value]
        size = torch.zeros(1, dtype=torch.int64, device=tp.device)
        dist.broadcast(size, 0, group=tp.group)
        buf = torch.empty(int(size), dtype=torch.uint8, device=tp.device)
        dist.broadcast(buf, 0, group=tp.group)
        return json.loads(buf.cpu().numpy().tobytes())
    except RuntimeError as e:
        raise TensorParallelError(f"tensor-parallel rank {tp.rank}/{tp.world}: the step broadcast failed — "
                                  f"{'a worker' if tp.rank == 0 else 'rank 0'} stopped or did not answer in time ({e})") from e


# -- a step's sequences, as the runner reads them ---------------------------------------------------------------
def encode_batch(batch: ScheduledBatch, observed: list[int]) -> dict[str, Any]:
    """What the runner reads of a scheduled batch: each sequence's tokens of this step (and the attributes its
    metadata is built from), the copies and rotations; ``observed``: the SnapKV observations rank 0 still holds."""
    seqs = []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        start = seq.num_computed
        seqs.append({"id": getattr(seq, "seq_id", -1), "start": start, "tokens": seq.tokens[start:start + n], "len": len(seq),
                     "prompt_len": seq.prompt_len, "spec": list(seq.spec_tokens), "shift": seq.kv_shift,
                     "table": list(seq.block_table), "window": list(getattr(seq, "window_table", [])),
                     "prompt_logprobs": seq.params.prompt_logprobs, "kv_budget": seq.params.kv_budget,
                     "kv_window": seq.params.kv_window, "adapter": seq.adapter})
    return {"op": "run", "seqs": seqs, "n": list(batch.num_tokens), "copies": [list(c) for c in batch.copies],
            "rotations": [list(r) for r in batch.rotations], "observed": observed}


class _Tokens:
    """A sequence's tokens from ``start`` on (a worker sees only those of the step)."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, s: slice) -> list[int]:
        return self.tokens[s.start - self.start:s.stop - self.start]


@dataclass
class StepSequence:
    """A worker's view of one of the step's sequences: what :class:`ModelRunner` reads of a Sequence."""

    seq_id: int
    num_computed: int
    tokens: _Tokens
    length: int
    prompt_len: int
    spec_tokens: list[int]
    kv_shift: int
    block_table: list[int]
    window_table: list[int]
    params: SimpleNamespace
    adapter: int = 0

    def __len__(self) -> int:
        return self.length


def decode_batch(msg: dict[str, Any]) -> ScheduledBatch:
    seqs = [StepSequence(s["id"], s["start"], _Tokens(s["start"], s["tokens"]), s["len"], s["prompt_len"], s["spec"],
                         s["shift"], s["table"], s["window"],
                         SimpleNamespace(prompt_logprobs=s["prompt_logprobs"], kv_budget=s["kv_budget"],
                                         kv_window=s["kv_window"]), s["adapter"])
            for s in msg["seqs"]]
    return ScheduledBatch(seqs, msg["n"], [tuple(c) for c in msg["copies"]],  # type: ignore[arg-type]
                          [tuple(r) for r in msg["rotations"]])


# -- rank 0 ------------------------------------------------------------------------------------------------------
class TensorParallelRunner:
    """Rank 0's runner: each call it makes is broadcast first, then made on its own runner; everything else is
    the runner's. A heartbeat thread keeps idle workers sure that rank 0 lives."""

    def __init__(self, runner: ModelRunner, tp: TensorParallel, settings: dict[str, Any], heartbeat_s: float) -> None:
        self.__dict__.update(runner=runner, tp=tp, lock=threading.Lock(), last_sent=time.monotonic(), closed=False)
        _no_native(runner)
        self._send({"op": "start", **settings})
        beat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="tp-heartbeat")
        self.__dict__["heartbeat"] = beat
        beat.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.runner, name, value)

    def send(self, msg: dict[str, Any]) -> None:
        """Broadcast an engine-level change (a LoRA adapter loaded or removed) for the workers to make too."""
        with self.lock:
            self._send(msg)

    def _send(self, msg: dict[str, Any]) -> None:
        broadcast_message(self.tp, msg)
        self.__dict__["last_sent"] = time.monotonic()

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        with self.lock:
            self._send(encode_batch(batch, list(self.runner.observed)))
            return self.runner.run(batch)

    def compact(self, seq: Any, old: list[int], new: list[int], n_cached: int, budget: int) -> None:
        with self.lock:
            self._send({"op": "compact", "id": seq.seq_id, "old": old, "new": new, "n_cached": n_cached,
                        "budget": budget})
            self.runner.compact(seq, old, new, n_cached, budget)

    def _beat(self, every: float) -> None:
        while not self.closed:
            time.sleep(every / 4)
            with self.lock:
                if self.closed:
                    return
                if time.monotonic() - self.last_sent > every:
                    try:
                        self._send({"op": "beat"})
                    except TensorParallelError:
                        return  # the next step raises it where a caller sees it

    def close(self, stop_workers: bool = True) -> None:
        """Stop the heartbeat and tell the workers to stop (they leave their loop); ``stop_workers=False`` leaves
        them waiting for another engine's ``start``."""
        with self.lock:
            if self.closed:
                return
            self.__dict__["closed"] = True
            if stop_workers:
                try:
                    self._send({"op": "stop"})
                except TensorParallelError:
                    pass


class DraftRunner:
    """Rank 0's runner of a layer-skip draft (the target's first layers, split as the target): each run is
    broadcast too, marked as the draft's, under the target runner's lock."""

    def __init__(self, runner: ModelRunner, target: TensorParallelRunner) -> None:
        self.runner, self.target = runner, target
        _no_native(runner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        with self.target.lock:
            self.target._send({**encode_batch(batch, []), "draft": True})
            return self.runner.run(batch)


def _no_native(runner: ModelRunner) -> None:
    runner.native = False
    runner.native_reason = "tensor parallelism: the C decode step has no all-reduce between its layers"


def attach(engine: Any, tp: TensorParallel, heartbeat_s: float = 30.0) -> Any:
    """Make ``engine`` (an LLMEngine on rank 0 over a :meth:`TensorParallel.parallelize`-d model) drive the
    workers; returns it. A draft model (speculative decoding) runs whole on rank 0, beside the split target; a
    layer-skip draft (the target's first layers) runs split on every rank, its steps broadcast as the target's;
    LoRA adapters are loaded on every rank, each taking its slice (attnkit.engine.lora)."""
    if tp.rank != 0:
        raise ValueError(f"the engine runs on rank 0; rank {tp.rank} runs serve_worker()")
    spec = engine.spec
    r = engine.runner
    settings = {"num_blocks": r.k_pool.shape[2], "block_size": r.block_size, "kv_dtype": r.kv_format.name,
                "batch_invariant": r.batch_invariant, "free_window_kv": engine.config.free_window_kv,
                "compile": r.compile, "draft_layers": None,
                "tail_slots": r.tail.slots if r.tail is not None else 0}  # a 4-bit cache's exact blocks, on every rank
    layerskip = spec is not None and spec.config.method == "layerskip"
    if layerskip:  # the draft is the target's first layers: every rank runs them, on its slice
        settings["draft_layers"] = len(spec.proposer.runner.model.layers)
    engine.runner = runner = TensorParallelRunner(r, tp, settings, heartbeat_s)
    if layerskip:
        spec.proposer.runner = DraftRunner(spec.proposer.runner, runner)
    add, remove = engine.add_lora, engine.remove_lora

    def add_lora(name: str, directory: Any) -> None:  # rank 0 first: a bad adapter fails before a worker hears of it
        add(name, directory)
        runner.send({"op": "add_lora", "name": name, "directory": str(directory)})

    def remove_lora(name: str) -> None:
        remove(name)
        runner.send({"op": "remove_lora", "name": name})

    engine.add_lora, engine.remove_lora = add_lora, remove_lora
    return engine


# -- ranks 1 … N−1 -----------------------------------------------------------------------------------------------
def serve_worker(model: torch.nn.Module, tp: TensorParallel) -> int:
    """A worker's loop: build the runner rank 0 describes, then perform each step it broadcasts until it says
    stop. Returns the number of steps run. A failed collective raises :class:`TensorParallelError`."""
    runner: ModelRunner | None = None
    draft: ModelRunner | None = None  # a layer-skip draft's runner over the first layers (pools shared)
    loras = None  # the adapters rank 0 loaded (attnkit.engine.lora.LoraAdapters), created by the first
    steps = 0
    while True:
        msg = broadcast_message(tp)
        op = msg["op"]
        if op == "stop":
            return steps
        if op == "beat":
            continue
        if op == "start":
            s = {k: msg[k] for k in _RUNNER_KEYS}
            runner = ModelRunner(model, s["num_blocks"], s["block_size"], compile=s["compile"], kv_dtype=s["kv_dtype"],
                                 batch_invariant=s["batch_invariant"], free_window_kv=s["free_window_kv"],
                                 tail_slots=s["tail_slots"])
            _no_native(runner)
            draft, loras = None, None  # a new engine starts without adapters, as rank 0's
            if msg.get("draft_layers"):
                from ..engine.proposers import first_layers

                n = msg["draft_layers"]
                draft = ModelRunner(first_layers(model, n), s["num_blocks"], s["block_size"], kv_dtype=s["kv_dtype"],
                                    batch_invariant=False, free_window_kv=False,
                                    pools=(runner.k_pool[:n], runner.v_pool[:n]))
                _no_native(draft)
            continue
        if runner is None:
            raise TensorParallelError(f"tensor-parallel rank {tp.rank}: step {op!r} before the runner's settings")
        if op == "run" and msg.get("draft"):
            if draft is None:
                raise TensorParallelError(f"tensor-parallel rank {tp.rank}: a draft step without a layer-skip draft")
            draft.run(decode_batch(msg))
        elif op == "run":
            for k in set(runner.observed) - set(msg["observed"]):
                del runner.observed[k]  # rank 0 dropped them without compacting
            runner.run(decode_batch(msg))
            steps += 1
        elif op == "add_lora":
            if loras is None:
                from ..engine.lora import LoraAdapters

                loras = LoraAdapters(model)
                runner.lora_step = loras.step
            loras.add(msg["name"], msg["directory"])
        elif op == "remove_lora":
            loras.remove(msg["name"])  # type: ignore[union-attr]
        elif op == "compact":
            seq = SimpleNamespace(seq_id=msg["id"])
            runner.compact(seq, msg["old"], msg["new"], msg["n_cached"], msg["budget"])  # type: ignore[arg-type]
        else:
            raise TensorParallelError(f"tensor-parallel rank {tp.rank}: unknown step {op!r}")
