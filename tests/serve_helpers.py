"""Shared pieces of the server tests: a uvicorn server on a free loopback port in a background thread,
an app on a tiny random Llama with the default model's tokenizer, and /metrics reading."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from attnkit.engine import EngineConfig, LLMEngine
from attnkit.serve import build_app
from engine_helpers import tiny_llama

TINY = "tiny-llama"


@contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port>; yields the base URL (``http://127.0.0.1:PORT``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def tiny_engine(tokenizer, **cfg) -> LLMEngine:
    model = tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)
    cfg.setdefault("kv_cache_bytes", 16 << 20)  # plenty for a 1024-token context; allocating 1 GiB takes seconds
    return LLMEngine(model, tokenizer, EngineConfig(**cfg), tokenizer.eos_ids)


def tiny_app(tokenizer, api_key: str | None = None, **cfg):
    return build_app(tiny_engine(tokenizer, **cfg), TINY, api_key=api_key)


def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpx.get(f"{base}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(base: str, name: str, **labels: str) -> float:
    return metrics(base).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
