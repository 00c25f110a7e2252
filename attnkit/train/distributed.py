"""Data-parallel training over torch.distributed, launched by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT from its rendezvous): DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating
Data Parallel Training", VLDB) or FSDP2's ``fully_shard`` (Zhao et al. 2023, "PyTorch FSDP: Experiences on
Scaling Fully Sharded Data Parallel", VLDB); gloo on CPU tensors, NCCL on CUDA tensors.

A step takes ``grad_accum`` global micro-batches of ``batch_size × world`` rows, drawn in one seeded order that
does not depend on the world size; rank r takes slice r of each. The loss of global micro-batch k is the
token-weighted mean over all its labelled tokens,

    L_k = Σ_r S_{k,r} / N_k,   N_k = Σ_r n_{k,r}  (one all-reduce of the step's token counts)

with S_{k,r} rank r's summed cross-entropy over its n_{k,r} tokens. DDP (§3.2: bucketed all-reduce of the
gradients, divided by the world size) and FSDP (reduce-scatter, also averaged) average over the ranks, so rank
r back-propagates W·S_{k,r} / (N_k·G): the average is ∇ Σ_k L_k / G, what one process computes on the whole
global batch. Parameters stay replicated under DDP; checkpoints hold full tensors, so a run resumes at any
world size.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.shm import process_alive

#: substrings of the errors a collective raises when a peer is gone or silent (gloo, NCCL, the c10d store)
_COMM_ERRORS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "reset by peer",
                "closed", "socket", "store")


class RankFailure(RuntimeError):
    """Another rank stopped, failed or did not answer within the timeout."""


@dataclass
class Dist:
    """This process's place in the job (world 1: no process group, every call below is local)."""

    rank: int = 0
    world: int = 1
    timeout_s: float = 300.0
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of each rank
    step: int = 0  # steps done (error messages name the step in progress: step + 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    # -- collectives that name a dead rank instead of hanging ---------------------------------------------
    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a collective's failure into a :class:`RankFailure` that names the rank that is gone."""
        try:
            yield
        except RankFailure:
            raise
        except RuntimeError as e:  # DistBackendError is one
            if not self.on:
                raise
            dead = self.dead_ranks()
            if not dead and not any(s in str(e).lower() for s in _COMM_ERRORS):
                raise
            if not dead:  # its sockets close a moment before its process is gone
                time.sleep(0.5)
                dead = self.dead_ranks()
            who = (f"rank {', '.join(map(str, dead))} stopped or failed (its process is gone)" if dead else
                   f"another rank stopped, failed or did not answer within the {self.timeout_s:g} s timeout")
            raise RankFailure(f"rank {self.rank}: {what} in step {self.step + 1} failed: {who} "
                              f"[{type(e).__name__}: {str(e).strip()[:300]}]") from e

    def dead_ranks(self) -> list[int]:
        host = socket.gethostname()
        return [r for r, (h, pid) in enumerate(self.peers) if r != self.rank and h == host and not process_alive(pid)]

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Σ over ranks of ``t`` (in place; returned)."""
        if self.on:
            with self.guard(what):
                dist.all_reduce(t)
        return t

    def broadcast(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self.on:
            with self.guard(what):
                dist.broadcast(t, 0)
        return t

    def barrier(self, what: str) -> None:
        if self.on:
            with self.guard(what):
                dist.barrier()



def _env_int(name: str, default: str | None = None) -> int:
    value = os.environ.get(name, default) or default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: not an integer") from None


def init_distributed(timeout_s: float = 300.0) -> Dist:
    """Join the job torchrun started (its env variables), or use a process group already initialised; a
    process outside any job (no WORLD_SIZE, or 1) is world 1. Backend: gloo for CPU tensors, NCCL for CUDA
    tensors where CUDA is present. ``timeout_s`` bounds every collective: a silent rank is an error, not a hang."""
    if timeout_s <= 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout_s}")
    if not dist.is_initialized():
        world = _env_int("WORLD_SIZE", "1")
        if world <= 1:
            return Dist(timeout_s=timeout_s)
        missing = [n for n in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                             "(it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        rank = _env_int("RANK")
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK"))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    d = Dist(rank=dist.get_rank(), world=dist.get_world_size(), timeout_s=timeout_s)
    if d.on:  # who is where, to name a rank whose process is gone
        me = torch.zeros(72, dtype=torch.int64)
        tag = socket.gethostname().encode()[:64]
        me[:len(tag)] = torch.tensor(list(tag))
        me[64] = os.getpid()
        out = [torch.zeros_like(me) for _ in range(d.world)]
        with d.guard("start-up (all_gather of the ranks' hosts)"):
            dist.all_gather(out, me)
        d.peers = [(bytes(int(c) for c in t[:64] if c).decode(errors="replace"), int(t[64])) for t in out]
    return d


# -- wrapping the model ---------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks of the first ``layers`` ModuleList under ``model`` (what FSDP shards one unit each)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers":
            return list(mod)
    return []


def wrap(model: nn.Module, d: Dist, fsdp: bool = False) -> nn.Module:
    """The module to run the training forward through: DDP over the trainable parameters (frozen ones — a
    LoRA base — get no hooks and no all-reduce), or FSDP2 (``fully_shard`` per decoder block, then the root;
    in place). World 1: ``model`` itself."""
    if not d.on:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def sync_gradients(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: reduce the gradients only on the step's last micro-batch."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)

        @contextmanager
        def restore() -> Iterator[None]:
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return restore()
    return nullcontext()


# -- full tensors for checkpoints (FSDP's parameters are DTensor shards) ----------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again (a no-grad forward leaves FSDP's root unsharded)."""
    for m in fsdp_units(model):
        m.reshard()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} of the trainable parameters (a collective under FSDP: every rank calls it)."""
    reshard(model)
    return {n: _full(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (tied ones once) and persistent buffer as a full tensor: what ``save_model`` writes, for a
    model whose ``state_dict`` is FSDP's sharded one (a collective under FSDP)."""
    reshard(model)
    out = {n: _full(p.detach()).contiguous() for n, p in model.named_parameters()}
    for prefix, mod in model.named_modules():
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and n not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{n}" if prefix else n] = b.detach().contiguous()
    return out


def copy_full_weights(sharded: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (a module of ``sharded``'s structure, without FSDP) given ``sharded``'s full parameters and
    buffers; returns it (a collective under FSDP: every rank calls it)."""
    reshard(sharded)
    with torch.no_grad():
        for (name, p), (name2, q) in zip(sharded.named_parameters(), plain.named_parameters(), strict=True):
            if name != name2:
                raise ValueError(f"copy_full_weights: parameter {name!r} meets {name2!r}: not the same structure")
            q.copy_(_full(p.detach()))
        for (name, b), (_, c) in zip(sharded.named_buffers(), plain.named_buffers(), strict=True):
            c.copy_(b)
    return plain


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """{"name::field": full tensor} of the optimizer state, keyed as :mod:`attnkit.train.checkpoint` does."""
    reshard(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(p)]}::{k}": _full(v.detach()).contiguous() for p, s in optimizer.state.items()
            for k, v in s.items() if torch.is_tensor(v)}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading full optimizer tensors into an FSDP model's optimizer: shard each like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for p, s in optimizer.state.items():
        if hasattr(p, "device_mesh"):
            for k, v in s.items():
                if torch.is_tensor(v) and not hasattr(v, "device_mesh") and v.shape == p.shape:
                    s[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
