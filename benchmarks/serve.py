"""Load test over HTTP of OpenAI-compatible servers, in the manner of vLLM's ``benchmark_serving.py``.

Starts ``attnkit serve`` itself (unless ``--no-attnkit``) and also measures every ``--url`` given
(any OpenAI-compatible server, e.g. llama.cpp's ``llama-server``), one after the other, with the same
prompts: N streaming /v1/completions requests at a fixed concurrency (``--concurrency``) or arriving
as a Poisson process (``--request-rate`` per second), with fixed or random lengths (``--range-ratio``:
each length uniform in [len·(1−r), len·(1+r)]), ``ignore_eos`` so every request produces its length.

``--json-schema FILE`` (or ``builtin``: a list of 40 small records) measures structured outputs: each
server, warmed up both ways, runs the prompts free and with every request constrained to the schema,
alternately (``--repeats`` constrained runs, each between free ones), in the same process (attnkit gets vLLM's ``structured_outputs`` field, the ``--url`` servers llama.cpp's
``json_schema`` field); the table adds the constrained run's output tok/s against the mean free run.

Per server: request throughput, output tokens/s, time to first token (TTFT), time per output token
after the first (TPOT), inter-token latency between streamed chunks (ITL) and end-to-end latency at
p50 and p99, and the error count. Prints a table and the JSON (``--json FILE`` also writes it).

    python benchmarks/serve.py [--quick] [--concurrency 8 | --request-rate 2] [--url http://host:port ...]
    attnkit bench serve -- --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, input_len: int, output_len: int, ratio: float, seed: int) -> list[tuple[str, int]]:
    """Random token ids of the default model's vocabulary, decoded to text (vLLM's random dataset)."""
    from attnkit.loading import defaults
    from attnkit.loading.gguf_file import GGUFFile
    from attnkit.text.tokenizer import Tokenizer

    path = defaults.default_chat_model()
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    rng = random.Random(seed)
    span = lambda x: rng.randint(max(1, int(x * (1 - ratio))), max(1, int(x * (1 + ratio))))  # noqa: E731
    return [(tok.decode([rng.randrange(1000, 40000) for _ in range(span(input_len))]), span(output_len))
            for _ in range(n)]


# long enough that no request's grammar ends before its output length: the engine meets objects, strings,
# integers, enums and arrays all the way
BUILTIN_SCHEMA = {"type": "array", "minItems": 40, "maxItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "role", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "role": {"enum": ["admin", "user", "guest"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}}


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool,
              headers: dict[str, str], extra: dict | None = None) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if ignore_eos:
        body["ignore_eos"] = True
    start = last = time.perf_counter()
    r = Result(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                return Result(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                data = json.loads(line[5:])
                if "error" in data:
                    return Result(ok=False, error=str(data["error"])[:200])
                if data.get("usage"):
                    usage = data["usage"]
                    r.prompt_tokens, r.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, ValueError) as e:
        return Result(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    r.latency = time.perf_counter() - start
    r.output_tokens = r.output_tokens or chunks
    r.ok = chunks > 0
    return r


async def run_load(url: str, model: str, prompts: list[tuple[str, int]], concurrency: int, rate: float,
                   ignore_eos: bool, api_key: str | None, seed: int, extra: dict | None = None
                   ) -> tuple[list[Result], float]:
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 1) if rate == float("inf") else None)
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=url, file=sys.stderr, leave=False)
    rng = np.random.default_rng(seed)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def task(p: tuple[str, int]) -> Result:
            async with sem:
                res = await one(client, url, model, p[0], p[1], ignore_eos, headers, extra)
            bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(task(p)))
            if rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def summarize(name: str, url: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731  (ms)
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "server": name, "url": url, "completed": len(ok), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "input_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        **{f"{k}_ms_p{q}": pct(v, q) for k, v in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e))
           for q in (50, 99)},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_attnkit(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "attnkit.cli", "serve", "--port", str(port), "--no-embeddings", "--log-level",
           "warning", "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(max(512, args.num_prompts))]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += shlex.split(args.serve_args)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"attnkit serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("attnkit serve did not start within 300 s")


def model_of(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def table(rows: list[dict]) -> str:
    cols = [("server", "server", "{}"), ("completed", "ok", "{}"), ("errors", "err", "{}"),
            ("request_throughput", "req/s", "{:.2f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}")]
    cols += [(f"{k}_ms_p{q}", f"{k.upper()} p{q} ms", "{:.0f}")
             for k in ("ttft", "tpot", "itl", "e2e") for q in (50, 99)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    if any("vs_free" in r for r in rows):
        cols.insert(5, ("vs_free", "vs free", "{:+.1%}"))
    lines += ["| " + " | ".join(fmt.format(r[k]) if k in r else "" for k, _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model for attnkit serve (default: the embedded SmolLM2)")
    p.add_argument("--url", action="append", default=[], help="another OpenAI-compatible server (repeatable)")
    p.add_argument("--no-attnkit", action="store_true", help="measure only the --url servers")
    p.add_argument("--api-key", default=None, help="bearer key for the --url servers")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="0: fixed lengths; r: uniform ±r")
    p.add_argument("--no-ignore-eos", action="store_true", help="for servers that reject ignore_eos")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--serve-args", default="", help='more flags for attnkit serve, e.g. "--quantize auto"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 prompts, 64 in / 16 out")
    p.add_argument("--json-schema", default=None, metavar="FILE|builtin",
                   help="also measure every request constrained to this JSON schema (free, constrained, free again)")
    p.add_argument("--repeats", type=int, default=2, help="with --json-schema: constrained runs, each between free ones")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 16, 64, 16
    if args.num_prompts < 1 or args.concurrency < 1 or args.request_rate <= 0 or not 0 <= args.range_ratio < 1:
        p.error("--num-prompts and --concurrency must be >= 1, --request-rate > 0, --range-ratio in [0, 1)")
    prompts = make_prompts(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    schema = None
    if args.json_schema:
        schema = BUILTIN_SCHEMA if args.json_schema == "builtin" else json.loads(open(args.json_schema).read())
    targets = [] if args.no_attnkit else [("attnkit", None)]
    targets += [(u.rstrip("/"), u.rstrip("/")) for u in args.url]
    rows, summary = [], []
    for name, url in targets:
        proc = None
        if url is None:
            proc, url = start_attnkit(args)
        try:
            key = None if proc else args.api_key
            model = model_of(url, key)
            runs = [(name, None)]
            if schema is not None:
                field_ = {"structured_outputs": {"json": schema}} if proc else {"json_schema": schema}
                # warmed up on both, then alternated: the machine's drift falls on both alike
                asyncio.run(run_load(url, model, prompts[:8], 8, float("inf"), not args.no_ignore_eos, key, args.seed))
                asyncio.run(run_load(url, model, prompts[:8], 8, float("inf"), not args.no_ignore_eos, key, args.seed,
                                     field_))
                runs = [(f"{name} free", None), (f"{name} json_schema", field_)] * args.repeats + [(f"{name} free", None)]
            first = len(rows)
            for label, extra in runs:
                results, duration = asyncio.run(run_load(url, model, prompts, args.concurrency, args.request_rate,
                                                         not args.no_ignore_eos, key, args.seed, extra))
                rows.append(summarize(label, url, results, duration))
            if schema is not None:
                mine = rows[first:]
                free = float(np.mean([r["output_tokens_per_s"] for r in mine if r["server"].endswith(" free")]))
                for r in mine:
                    if r["server"].endswith("json_schema"):
                        r["vs_free"] = r["output_tokens_per_s"] / free - 1
                summary.append({"server": name, "free_tokens_per_s": free, "json_schema_tokens_per_s": float(np.mean(
                    [r["output_tokens_per_s"] for r in mine if r["server"].endswith("json_schema")])) })
                summary[-1]["loss"] = 1 - summary[-1]["json_schema_tokens_per_s"] / free
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # attnkit bench runs this file with runpy
    from _report import cpu_model

    report = {"benchmark": "serve", "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                "python": platform.python_version()},
              "config": {k: v for k, v in vars(args).items() if k not in ("api_key",)}, "results": rows}
    if summary:
        report["json_schema_vs_free"] = summary
    try:
        import torch

        report["machine"]["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    print(table(rows))
    for r in summary:
        print(f"{r['server']}: json_schema {r['json_schema_tokens_per_s']:.1f} out tok/s vs free {r['free_tokens_per_s']:.1f} "
              f"(mean of the runs): {r['loss']:+.1%} loss")
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
