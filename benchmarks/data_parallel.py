"""Data-parallel serving (``attnkit serve --data-parallel-size N``): throughput of N concurrent requests with one
engine against N replica processes, and what the router costs per request.

Every engine is built as ``attnkit serve`` builds it (:func:`attnkit.serve.cli.build_engine`; default model: the
embedded SmolLM2-135M Q4_1). Runs:

- in-process: one :class:`AsyncLLMEngine` on all the cores (``--data-parallel-size 1``, today's path);
- router, 1 replica: the same engine behind :class:`DataParallelEngine` (all the cores): the router's own cost;
- router, D replicas: ``--data-parallel-size D`` (cores // D threads each).

Each run sends ``--requests`` distinct prompts at once (greedy, ``ignore_eos``, ``--max-tokens`` each) and reports
generated tokens per second and whether the texts equal the in-process run's. Router overhead: the mean latency of
sequential one-token requests (end to end, and admission alone) through the router with one replica minus
in-process; the routing decision alone; one RequestOutput across the pipe.
Prints a table and the JSON (``--json FILE`` also writes it).

    python benchmarks/data_parallel.py [--model PATH] [--requests 8] [--max-tokens 64] [--replicas 2] [--repeats 3]
                                       [--json FILE]
    attnkit bench data_parallel -- --requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model, write_report  # noqa: E402

TOPICS = ["a lighthouse", "the moon", "a lost key", "a robot", "the sea", "a small town", "winter", "a violin",
          "a dragon", "the desert", "a train", "a garden", "a clock", "a storm", "a library", "a fox"]


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


async def burst(engine, texts: list[str], max_tokens: int) -> tuple[float, list[str], int]:
    """All ``texts`` at once; (seconds, output texts, generated tokens)."""
    from attnkit.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int, text: str):
        last = None
        async for out in engine.generate(text, params, request_id=f"b{time.perf_counter_ns()}-{i}"):
            last = out
        return last

    t = time.perf_counter()
    outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(texts)))
    return time.perf_counter() - t, [o.text for o in outs], sum(len(o.token_ids) for o in outs)


async def one_token_latency(engine, k: int) -> tuple[float, float]:
    """Mean seconds of ``k`` sequential one-token requests (the same short prompt), and of their admission alone
    (``add_request`` until the engine — or the replica, over its pipe — accepted the request)."""
    from attnkit.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1)
    admit = 0.0
    t = time.perf_counter()
    for i in range(k):
        a = time.perf_counter()
        stream = await engine.add_request("Hi", params, f"l{time.perf_counter_ns()}-{i}")
        admit += time.perf_counter() - a
        async for _ in stream:
            pass
    return (time.perf_counter() - t) / k, admit / k


def wire_cost(k: int = 2000) -> float:
    """Microseconds to carry one RequestOutput (64 tokens, 5 logprobs each) across the pipe: to a dict, pickled,
    unpickled, back (what the replica and the router do per request per step)."""
    import pickle

    from attnkit.engine.dp_replica import output_from_wire, output_to_wire
    from attnkit.engine.outputs import CompletionOutput, RequestOutput

    toks = list(range(1000, 1064))
    out = RequestOutput("r", None, list(range(40)), [CompletionOutput(0, "x" * 300, toks, None, None,
                                                                      [{t + j: -0.5 * j for j in range(5)} for t in toks])],
                        False)
    t = time.perf_counter()
    for _ in range(k):
        output_from_wire(pickle.loads(pickle.dumps(output_to_wire(out))))
    return (time.perf_counter() - t) / k * 1e6


def route_cost(router, k: int = 20000) -> float:
    """Microseconds of one routing decision (hashing a 64-token prompt's blocks, picking, recording)."""
    ids = list(range(64))
    t = time.perf_counter()
    with router._lock:
        for i in range(k):
            router._route("route-bench", ids[:-1] + [i], None)
            for r in router.replicas:
                r.load = 0
    return (time.perf_counter() - t) / k * 1e6


def measure(engine, texts: list[str], max_tokens: int, latency_k: int, repeats: int) -> dict:
    """The best of ``repeats`` bursts and of ``repeats`` latency rounds (the machine may be shared)."""
    async def go():
        await burst(engine, texts[:1], 4)  # warm-up: the first forward's one-off costs
        bursts = [await burst(engine, texts, max_tokens) for _ in range(repeats)]
        lats = [await one_token_latency(engine, latency_k) for _ in range(repeats)]
        return min(bursts, key=lambda b: b[0]), min(lats)

    (secs, out, toks), (lat, admit) = asyncio.run(go())
    return {"seconds": round(secs, 3), "tokens": toks, "tokens_per_s": round(toks / secs, 1),
            "one_token_latency_ms": round(lat * 1e3, 2), "admission_ms": round(admit * 1e3, 3), "texts": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests per run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=2, help="data-parallel size of the last run")
    ap.add_argument("--latency-requests", type=int, default=20, help="sequential one-token requests per run")
    ap.add_argument("--repeats", type=int, default=3, help="bursts and latency rounds per run (the best is kept)")
    ap.add_argument("--kv-cache-mb", type=int, default=256, help="KV pool per engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("requests", "max_tokens", "replicas", "latency_requests", "repeats", "kv_cache_mb"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import torch

    from attnkit.cli import build_parser
    from attnkit.engine import AsyncLLMEngine
    from attnkit.engine.data_parallel import DataParallelEngine, load_tokenizer
    from attnkit.serve.cli import build_engine, replica_engine

    cores = len(os.sched_getaffinity(0))
    serve = build_parser().parse_args(["serve", "--no-embeddings", "--kv-cache-mb", str(args.kv_cache_mb)]
                                      + (["--model", args.model] if args.model else []))
    texts = prompts(args.requests)
    tokenizer, path = load_tokenizer(args.model)
    runs = {}
    torch.set_num_threads(cores)
    runs["in-process"] = measure(AsyncLLMEngine(build_engine(serve)[0]), texts, args.max_tokens,
                                 args.latency_requests, args.repeats)
    route_us = None
    for label, size in (("router, 1 replica", 1), (f"router, {args.replicas} replicas", args.replicas)):
        t = time.perf_counter()
        router = DataParallelEngine(functools.partial(replica_engine, serve), size, tokenizer)
        start = time.perf_counter() - t
        try:
            runs[label] = measure(router, texts, args.max_tokens, args.latency_requests, args.repeats)
            runs[label] |= {"start_s": round(start, 2), "threads_per_replica": router.threads,
                            "requests_per_replica": [sum(1 for i in router.routed.values() if i == r.index)
                                                     for r in router.replicas]}
            route_us = route_cost(router)
        finally:
            router.close()
    ref = runs["in-process"]["texts"]
    for r in runs.values():
        r["same_texts_as_in_process"] = r.pop("texts") == ref
    overhead_ms = round(runs["router, 1 replica"]["one_token_latency_ms"] - runs["in-process"]["one_token_latency_ms"], 2)
    admit_ms = round(runs["router, 1 replica"]["admission_ms"] - runs["in-process"]["admission_ms"], 3)
    wire_us = wire_cost()

    print(f"{args.requests} concurrent requests x {args.max_tokens} tokens, {path.name}, {cores} cores "
          f"({cpu_model()})\n")
    print(f"{'run':<22} {'tok/s':>8} {'seconds':>8} {'1-token req ms':>15} {'admission ms':>13} {'same texts':>11}")
    for label, r in runs.items():
        print(f"{label:<22} {r['tokens_per_s']:>8.1f} {r['seconds']:>8.2f} {r['one_token_latency_ms']:>15.2f} "
              f"{r['admission_ms']:>13.3f} {str(r['same_texts_as_in_process']):>11}")
    print(f"\nrouter overhead per request (router with 1 replica minus in-process): {overhead_ms} ms end to end "
          f"(1-token request), {admit_ms} ms at admission; routing decision {route_us:.1f} us; one output across "
          f"the pipe {wire_us:.1f} us\n")
    write_report({"benchmark": "data_parallel", "model": str(path), "requests": args.requests,
                  "max_tokens": args.max_tokens, "cores": cores, "cpu": cpu_model(), "python": platform.python_version(),
                  "torch": torch.__version__, "runs": runs, "router_overhead_ms_per_request": overhead_ms,
                  "router_admission_overhead_ms": admit_ms, "routing_decision_us": round(route_us, 2),
                  "wire_us_per_output": round(wire_us, 1)}, args.json)


if __name__ == "__main__":
    main()
