"""Collectives through shared memory, for tensor-parallel ranks on one machine.

gloo moves each collective through the loopback TCP stack: on a small VM an all-reduce of a few thousand floats
costs milliseconds, dozens of times per decode token (docs/distributed.md). Ranks on one machine can instead
exchange through one shared segment, as vLLM's CPU backend does: each rank writes its tensor into its own slot,
raises its flag to the collective's sequence number, waits until every flag has reached it, then reads all the
slots — summing them in rank order (all-reduce: the same bits on every rank), concatenating them (all-gather) or
taking rank 0's (broadcast).

Slots alternate between two buffers by the parity of the sequence number. A rank writes buffer b at step n only
after it saw every flag reach n − 1, and a rank raises its flag to n − 1 only after it finished reading step n − 2
(its program is sequential), so nobody overwrites a buffer another rank is still reading. Stores are ordered on
x86 (a flag raised after its data is never seen before it), so the exchange is used there only; elsewhere, and for
tensors larger than a slot, gloo. A wait spins briefly, then sleeps in growing steps (an idle worker waiting for
the next step costs no CPU), checks that its peers' processes live, and gives up after the group's timeout.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import platform
import secrets
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

#: bytes of one rank's slot in each of the two buffers
SLOT_BYTES = 4 << 20
_FLAG_STRIDE = 8  # int64s between two ranks' flags: one 64-byte cache line each
_HEADER = 4096


class PeerFailed(RuntimeError):
    """A peer's process exited, or it did not reach a collective within the timeout."""


def _host_id() -> int:
    """An id of this machine (this boot of it) that two ranks compare to know they share memory."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    return int.from_bytes(hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).digest()[:7], "little")


def usable(world: int) -> bool:
    """x86 (ordered stores), not turned off (ATTNKIT_TP_SHM=0), and room in /dev/shm for the segment (a container's
    is often 64 MB: a mapping past its free space would fault on first write)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("ATTNKIT_TP_SHM", "1") == "0":
        return False
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= 2 * segment_bytes(world)


def segment_bytes(world: int) -> int:
    return _HEADER + 2 * world * SLOT_BYTES


class SharedExchange:
    """One segment for ``world`` ranks of one machine: slots, flags, and the peers' pids to check they live."""

    def __init__(self, rank: int, world: int, path: str, create: bool, pids: list[int], timeout_s: float) -> None:
        """Map the segment file ``path`` (in /dev/shm: memory, not disk), creating it on rank 0."""
        self.rank, self.world, self.pids, self.timeout_s = rank, world, pids, timeout_s
        size = segment_bytes(world)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.segment = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.flags = np.ndarray((world, _FLAG_STRIDE), dtype=np.int64, buffer=self.segment)
        self.data = torch.frombuffer(self.segment, dtype=torch.uint8, offset=_HEADER)  # (2·world·SLOT_BYTES,)
        self.seq = 0

    @classmethod
    def join(cls, rank: int, world: int, timeout_s: float, group=None) -> SharedExchange | None:
        """Every rank of the (gloo) group calls this; the exchange when all ranks share this machine, else None."""
        ids = torch.tensor([_host_id(), os.getpid(), int(usable(world))], dtype=torch.int64)
        every = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(every, ids, group=group)
        if len({int(t[0]) for t in every}) != 1 or not all(int(t[2]) for t in every):
            return None
        name = torch.tensor(list(secrets.token_bytes(8)), dtype=torch.uint8) if rank == 0 else torch.empty(8, dtype=torch.uint8)
        dist.broadcast(name, 0, group=group)
        path = f"/dev/shm/attnkit_tp_{int(every[0][1])}_{bytes(name.tolist()).hex()}"
        pids = [int(t[1]) for t in every]
        if rank == 0:
            ex = cls(rank, world, path, True, pids, timeout_s)
        dist.barrier(group=group)
        if rank != 0:
            ex = cls(rank, world, path, False, pids, timeout_s)
        dist.barrier(group=group)
        if rank == 0:  # every rank has it mapped: the name can go (the memory stays until the last mapping closes)
            os.unlink(path)
        return ex

    def _slot(self, buffer: int, rank: int, nbytes: int) -> torch.Tensor:
        start = (buffer * self.world + rank) * SLOT_BYTES
        return self.data[start:start + nbytes]

    def exchange(self, payload: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``payload`` (uint8, the same byte count on every rank) as views of the segment, in rank
        order, valid until the next exchange; None (on every rank alike) if it does not fit a slot."""
        nbytes = payload.numel()
        if nbytes > SLOT_BYTES:
            return None
        buf = self._publish(lambda slot: slot[:nbytes].copy_(payload))
        return [self._slot(buf, r, nbytes) for r in range(self.world)]

    def broadcast(self, data: bytes | None) -> bytes | None:
        """Rank 0's ``data`` on every rank; None (on every rank alike) if it does not fit a slot."""
        def write(slot: torch.Tensor) -> None:
            if self.rank == 0:
                fits = len(data) + 8 <= SLOT_BYTES  # type: ignore[arg-type]
                slot[:8].copy_(torch.tensor([len(data) if fits else -1], dtype=torch.int64).view(torch.uint8))  # type: ignore[arg-type]
                if fits:
                    slot[8:8 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # type: ignore[arg-type]

        root = self._slot(self._publish(write), 0, SLOT_BYTES)
        size = int(root[:8].view(torch.int64))
        return None if size < 0 else root[8:8 + size].numpy().tobytes()

    def _publish(self, write) -> int:
        """Write this rank's slot of the next buffer, raise its flag, wait for every rank's; returns the buffer."""
        self.seq += 1
        buf = self.seq % 2
        write(self._slot(buf, self.rank, SLOT_BYTES))
        self.flags[self.rank, 0] = self.seq  # after the data (x86: stores stay in order)
        self._wait(self.seq)
        return buf

    def _wait(self, seq: int) -> None:
        flags = self.flags[:, 0]
        if flags.min() >= seq:
            return
        spins, start, nap = 0, time.monotonic(), 0.0
        while flags.min() < seq:
            spins += 1
            if spins < 2000:  # a few ms at most: then sleep (more ranks than cores must not starve one another)
                continue
            time.sleep(nap)
            nap = min(1e-3, nap * 2 or 2e-6)
            if spins % 64 == 0:
                late = [r for r in range(self.world) if flags[r] < seq]
                gone = [r for r in late if not process_alive(self.pids[r])]
                if gone:
                    raise PeerFailed(f"rank {gone[0]} (pid {self.pids[gone[0]]}) exited")
                if time.monotonic() - start > self.timeout_s:
                    raise PeerFailed(f"rank {late[0]} did not reach the collective within {self.timeout_s:.0f} s")

    def close(self) -> None:
        self.flags = None  # type: ignore[assignment]
        self.data = None  # type: ignore[assignment]
        try:
            self.segment.close()
        except BufferError:  # a view is still referenced: the mapping goes with the process
            pass


def process_alive(pid: int) -> bool:
    """The process of this machine runs (a zombie — exited, not yet reaped by its parent — does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
