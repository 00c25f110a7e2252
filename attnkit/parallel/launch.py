"""Starting tensor-parallel ranks: under ``torchrun`` (its rendezvous, on one machine or several) or spawned here.

``torchrun --nproc_per_node N [--nnodes M --node-rank R --master-addr HOST] -m attnkit serve ...`` starts every
rank itself and sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; ``attnkit serve --tensor-parallel-size N``
spawns ranks 1 … N−1 on this machine and is rank 0. Either way each rank joins the process group (gloo on the
CPU, NCCL on CUDA, with a timeout so that a rank that stops is an error on the others, never a hang), loads only
its slice of the weights (:mod:`attnkit.parallel.tensor`), and ranks other than 0 run
:func:`~attnkit.parallel.engine.serve_worker` until rank 0 stops.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .shm import SharedExchange
from .tensor import TensorParallel

DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join_group(rank: int, world: int, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
               threads: int | None = None) -> TensorParallel:
    """Join the default process group as ``rank`` of ``world`` (MASTER_ADDR / MASTER_PORT from the environment)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor parallelism: rank {rank} of a world of {world}")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if threads is None:  # the machine's cores shared among the ranks running on it
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    tp = TensorParallel(rank, world, device=device)
    if backend == "gloo":  # ranks of one machine exchange through shared memory (attnkit.parallel.shm)
        tp.shm = SharedExchange.join(rank, world, timeout_s)
    return tp


def join_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallel:
    """Join the group torchrun describes (RANK, WORLD_SIZE and its rendezvous variables)."""
    return join_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, timeout_s)


def _worker(index: int, world: int, port: int, model: Callable[[TensorParallel], Any], device: str,
            timeout_s: float, threads: int | None = None) -> None:
    """Spawned rank ``index + 1``: join, load its slice (``model(tp)``), serve rank 0's steps until it says stop."""
    from .engine import serve_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tp = join_group(index + 1, world, device, timeout_s, threads)
    try:
        serve_worker(model(tp), tp)
    finally:
        dist.destroy_process_group()


def spawn_workers(world: int, model: Callable[[TensorParallel], Any], device: str = "cpu",
                  timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> tuple[TensorParallel, Any]:
    """Spawn ranks 1 … ``world``−1 on this machine, each loading its slice with ``model(tp)`` (picklable: a
    module-level function or a partial of one), and join as rank 0; returns (rank 0's TensorParallel, the
    workers' process context, whose ``join()`` waits for them). ``threads``: torch threads of each rank (default:
    the machine's cores // world)."""
    if world < 2:
        raise ValueError(f"--tensor-parallel-size must be at least 2 to spawn workers, got {world}")
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = mp.start_processes(_worker, args=(world, port, model, device, timeout_s, threads), nprocs=world - 1,
                             join=False, start_method="spawn")
    return join_group(0, world, device, timeout_s, threads), ctx
