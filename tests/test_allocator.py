"""attnkit.kernels.allocator: freed large activations are reused, not mapped afresh each step."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# mallinfo2's hblkhd counts the bytes in mmap'ed chunks; each script prints (policy applied, bytes mapped)
MALLINFO = """
import ctypes, sys, torch
from attnkit.kernels.allocator import return_freed_memory, tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
"""

# a tensor of sys.argv[1] MB, then where glibc put it
WHERE = MALLINFO + """
tuned = tune_malloc()
before = libc.mallinfo2().hblkhd
t = torch.ones(int(sys.argv[1]) << 18)
print(tuned, libc.mallinfo2().hblkhd - before)
"""


def mapped_bytes(script: str, env: dict[str, str], *argv: str) -> tuple[str, int]:
    """Run a MALLINFO script in a fresh process (the policy given by ``env``) → (policy applied, bytes mapped)."""
    env = {**{k: v for k, v in os.environ.items() if k != "ATTNKIT_NO_MALLOC_TUNING"}, **env}
    run = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=120)
    if run.returncode and "mallinfo2" in run.stderr:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    done, mapped = run.stdout.split()
    return done, int(mapped)


@pytest.mark.parametrize("mb", [20, 40])
def test_tuned_malloc_keeps_large_tensors_on_the_heap(mb):
    """The mechanism, exactly: tuned, a 20 MB tensor comes from the heap (reused step after step), and so does one
    past glibc's 32 MiB ceiling for the mmap threshold (a 1B's 512-row gate/up output is 32 MiB and a header);
    untuned, each from a fresh mapping of its own (unmapped when freed, faulted in again by the next step)."""
    out = dict(mapped_bytes(WHERE, {} if tuning else {"ATTNKIT_NO_MALLOC_TUNING": "1"}, str(mb)) for tuning in (True, False))
    assert out["True"] == 0 and out["False"] >= mb << 20, out  # (the mapping: the tensor and a page of header)


# tuned, a 100 MB tensor made and filled on another thread (its own arena's heaps hold at most 64 MB)
IN_A_THREAD = MALLINFO + """
import threading
tuned = tune_malloc()
out = []
def work():
    t = torch.ones(100 << 18)
    out.append(float(t.sum()))
th = threading.Thread(target=work)
th.start()
th.join()
print(tuned, int(out[0]))
"""


def test_tuned_malloc_serves_a_large_block_on_another_thread():
    """With mmap off, a block larger than a thread arena's heap is served by the main heap (glibc's arena retry):
    the server's engine thread allocates such blocks (a KV pool, a long prompt's activations)."""
    done, total = mapped_bytes(IN_A_THREAD, {})
    assert done == "True" and total == 100 << 18


def test_the_engine_tunes_malloc_on_the_cpu():
    import torch

    from attnkit.engine import LLMEngine
    from attnkit.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
    engine = LLMEngine(Llama(cfg), eos_ids=set())
    assert engine.malloc_tuned == (not os.environ.get("ATTNKIT_NO_MALLOC_TUNING"))


# a 20 MB tensor freed, then a 2 MB one: where glibc put the second (bytes in mmap'ed chunks)
AFTER_A_FREE = MALLINFO + """
done = return_freed_memory() if sys.argv[1] == "1" else False
big = torch.ones(20 << 18)
del big
before = libc.mallinfo2().hblkhd
small = torch.ones(2 << 18)
print(done, libc.mallinfo2().hblkhd - before)
"""


def test_returning_freed_memory_keeps_large_tensors_off_the_heap():
    """glibc alone raises its mmap threshold to a freed mapping's size, so the next 2 MB tensor comes from the heap
    (and stays there when freed); after return_freed_memory() it gets a mapping of its own, unmapped when freed."""
    out = dict(mapped_bytes(AFTER_A_FREE, {}, on) for on in ("1", "0"))
    assert out["True"] >= 2 << 20 and out["False"] == 0, out


# tuned (mmap off), then return_freed_memory(): where a 2 MB tensor goes
AFTER_TUNING = MALLINFO + """
tune_malloc()
done = return_freed_memory()
before = libc.mallinfo2().hblkhd
small = torch.ones(2 << 18)
print(done, libc.mallinfo2().hblkhd - before)
"""


def test_returning_freed_memory_turns_mmap_back_on():
    """A process that served (tune_malloc: no mmap) and then trains under a budget gets mappings again."""
    done, mapped = mapped_bytes(AFTER_TUNING, {})
    assert done == "True" and mapped >= 2 << 20
