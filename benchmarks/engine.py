"""The inference engine against its peers on the default model (SmolLM2-135M-Instruct), same machine.

Measured for each system installed — attnkit's engine (one or more ``--variants``: float32, bf16,
int8, int4 = the GGUF's own Q4_1 blocks kept in memory, with or without torch.compile), HF
transformers (``generate``, batched with left padding), llama.cpp through ``llama-cpp-python``
(optional; requests one by one) and, given ``--llama-server PATH``, llama.cpp's own server with
parallel slots for the offline workload — each in a fresh process, on the same random token ids:

- single stream: time to first token (TTFT) and decode tokens/s, for a 32- and a 512-token prompt;
- offline throughput: N requests (default 64), input 32–512 and output 32–256 tokens (uniform),
  greedy with ignore_eos: output tokens/s and total (input + output) tokens/s;
- prefill speed of the 512-token prompt (512 / its TTFT), model load time and peak RSS.

Prints a table and the JSON (``--json FILE`` also writes it).

    python benchmarks/engine.py [--quick] [--no-hf] [--threads N] [--variants default,int4,...]
                                [--llama-server PATH] [--json FILE]
    attnkit bench engine -- --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def workload(quick: bool, n_requests: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731 (ordinary-text ids of SmolLM2)
    lo_in, hi_in, lo_out, hi_out = (32, 128, 16, 64) if quick else (32, 512, 32, 256)
    n = 16 if quick and n_requests == 64 else n_requests
    return {
        "single": [tok(32), tok(512)],
        "single_new": 32 if quick else 128,
        "offline": [(tok(rng.randint(lo_in, hi_in)), rng.randint(lo_out, hi_out)) for _ in range(n)],
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bar(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)
    except ImportError:  # pragma: no cover
        return None


VARIANTS = {  # attnkit configurations: LLM(**kwargs)
    "default": {},
    "default-f32mm": {"matmul_dtype": "float32"},  # the default with float32 prefill products (auto is bf16 on bf16 hardware)
    "default-variant": {"batch_invariant": False},  # products chosen by each step's row count: batch invariance's cost
    "float32": {"quantize": None},
    "bf16": {"quantize": None, "dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "auto"},  # the GGUF's Q4_1 blocks on PyTorch's int4 kernel
    "gguf": {"quantize": "gguf"},  # the GGUF's blocks under attnkit's own kernel
    "gguf-compile": {"quantize": "gguf", "compile": True},
    "float32-compile": {"quantize": None, "compile": True},
}


def run_attnkit(w: dict, variant: str) -> dict:
    from attnkit import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**VARIANTS[variant])
    res: dict = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    for n in (3, 40):  # warm-up; with compile=True this compiles the decode step
        llm.generate([list(range(1, n))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    res["warmup_s"] = time.perf_counter() - t0
    n_new = w["single_new"]
    for prompt in w["single"]:
        o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0]
        m = o.metrics
        res[f"ttft_{len(prompt)}_s"] = m.ttft
        res[f"decode_{len(prompt)}_tok_s"] = (n_new - 1) / (m.finish_time - m.first_token_time)
    reqs = w["offline"]
    total_out = sum(n for _, n in reqs)
    pb = bar(total_out, f"attnkit {variant} offline")
    t = time.perf_counter()
    seen: dict[str, int] = {}
    for out in llm.stream([p for p, _ in reqs], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                                  for _, n in reqs]):
        if pb is not None:
            pb.update(len(out.token_ids) - seen.get(out.request_id, 0))
        seen[out.request_id] = len(out.token_ids)
    dt = time.perf_counter() - t
    if pb is not None:
        pb.close()
    assert sum(seen.values()) == total_out
    res.update(offline_s=dt, offline_out_tok_s=total_out / dt,
               offline_total_tok_s=(total_out + sum(len(p) for p, _ in reqs)) / dt,
               preemptions=llm.engine.scheduler.num_preemptions, steps=llm.engine.num_steps)
    return res


def run_transformers(w: dict, batch: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    from attnkit.loading.defaults import default_chat_model

    p = default_chat_model()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    res: dict = {"load_s": time.perf_counter() - t0, "batch": batch}
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def gen(prompts: list[list[int]], new: int) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)

    gen([[1, 2, 3]], 2)  # warm-up
    n_new = w["single_new"]
    for prompt in w["single"]:
        t = time.perf_counter()
        gen([prompt], 1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        gen([prompt], n_new)
        res[f"ttft_{len(prompt)}_s"] = ttft
        res[f"decode_{len(prompt)}_tok_s"] = (n_new - 1) / (time.perf_counter() - t - ttft)
    reqs = w["offline"]
    total_out = sum(n for _, n in reqs)
    pb = bar(total_out, "transformers offline")
    t = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        gen([q for q, _ in chunk], max(n for _, n in chunk))  # each row to the batch's longest; only its own count
        if pb is not None:
            pb.update(sum(n for _, n in chunk))
    dt = time.perf_counter() - t
    if pb is not None:
        pb.close()
    res.update(offline_s=dt, offline_out_tok_s=total_out / dt,
               offline_total_tok_s=(total_out + sum(len(q) for q, _ in reqs)) / dt)
    return res


def run_llama_cpp(w: dict, threads: int) -> dict:  # pragma: no cover - optional peer, not installed in CI
    import llama_cpp

    from attnkit.loading.defaults import default_chat_model

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(default_chat_model()), n_ctx=1024, n_threads=threads or None, verbose=False)
    res: dict = {"load_s": time.perf_counter() - t0}

    def gen(prompt: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        first = None
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1)):
            if first is None:
                first = time.perf_counter()
            if i + 1 == new:
                break
        return first - t, time.perf_counter() - first

    n_new = w["single_new"]
    for prompt in w["single"]:
        ttft, rest = gen(prompt, n_new)
        res[f"ttft_{len(prompt)}_s"] = ttft
        res[f"decode_{len(prompt)}_tok_s"] = (n_new - 1) / rest
    reqs = w["offline"]
    t = time.perf_counter()
    for q, n in reqs:
        gen(q, n)
    dt = time.perf_counter() - t
    total_out = sum(n for _, n in reqs)
    res.update(offline_s=dt, offline_out_tok_s=total_out / dt,
               offline_total_tok_s=(total_out + sum(len(q) for q, _ in reqs)) / dt)
    return res


def run_llama_server(w: dict, binary: str, threads: int, slots: int) -> dict:  # pragma: no cover - optional peer
    """llama.cpp's own server with ``slots`` parallel sequences (continuous batching): the offline workload
    sent over HTTP with ``slots`` requests in flight, greedy, ignore_eos, no prompt cache reuse."""
    import socket
    import threading
    import urllib.request

    from attnkit.loading.defaults import default_chat_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reqs = w["offline"]
    ctx = slots * max(len(q) + n for q, n in reqs)
    cmd = [binary, "-m", str(default_chat_model()), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(ctx), "-t", str(threads or os.cpu_count()), "--no-webui"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("llama-server did not start") from None
                time.sleep(0.2)
        res: dict = {"load_s": time.perf_counter() - t0, "slots": slots}
        total_out = sum(n for _, n in reqs)
        pb = bar(total_out, "llama-server offline")
        todo = list(reqs)
        lock = threading.Lock()
        got: list[int] = []

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    q, n = todo.pop(0)
                body = json.dumps({"prompt": q, "n_predict": n, "ignore_eos": True, "temperature": 0.0,
                                   "cache_prompt": False}).encode()
                req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=3600) as r:
                    out = json.loads(r.read())
                with lock:
                    got.append(out["tokens_predicted"])
                    if pb is not None:
                        pb.update(out["tokens_predicted"])

        t = time.perf_counter()
        workers = [threading.Thread(target=worker) for _ in range(slots)]
        for th in workers:
            th.start()
        for th in workers:
            th.join()
        dt = time.perf_counter() - t
        if pb is not None:
            pb.close()
        res.update(offline_s=dt, offline_out_tok_s=sum(got) / dt,
                   offline_total_tok_s=(sum(got) + sum(len(q) for q, _ in reqs)) / dt, completed=len(got))
        with open(f"/proc/{proc.pid}/status") as f:  # the server's own peak RSS (VmHWM)
            res["peak_rss_mb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
        return res
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def child(name: str, args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    w = workload(args.quick, args.requests)
    if name.startswith("attnkit"):
        res = run_attnkit(w, name.partition(":")[2] or "default")
    elif name == "transformers":
        res = run_transformers(w, args.hf_batch)
    elif name == "llama-server":
        res = run_llama_server(w, args.llama_server, args.threads, args.llama_slots)
    else:
        res = run_llama_cpp(w, args.threads)
    res.setdefault("peak_rss_mb", peak_rss_mb())
    if "ttft_512_s" in res:
        res["prefill_512_tok_s"] = 512 / res["ttft_512_s"]
    print("RESULT " + json.dumps(res))
    return 0


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


COLUMNS = [("load_s", "load s", 2), ("peak_rss_mb", "peak RSS MB", 0), ("ttft_32_s", "TTFT 32 s", 3),
           ("decode_32_tok_s", "decode tok/s (32)", 1), ("ttft_512_s", "TTFT 512 s", 3),
           ("prefill_512_tok_s", "prefill tok/s (512)", 0),
           ("decode_512_tok_s", "decode tok/s (512)", 1), ("offline_out_tok_s", "offline out tok/s", 1),
           ("offline_total_tok_s", "offline total tok/s", 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller workload (16 requests, shorter texts): ~2 minutes")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--hf-batch", type=int, default=16, help="HF generate batch size (padded)")
    ap.add_argument("--threads", type=int, default=0, help="threads for every system (0 = each one's default)")
    ap.add_argument("--variants", default="default",
                    help=f"comma-separated attnkit configurations, each measured in its own process: {', '.join(VARIANTS)}")
    ap.add_argument("--llama-server", default=None, metavar="PATH",
                    help="llama.cpp's llama-server binary: also run the offline workload through it")
    ap.add_argument("--llama-slots", type=int, default=16, help="llama-server parallel slots (-np)")
    ap.add_argument("--json", default=None, help="also write the JSON report to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    systems = [f"attnkit:{v}" for v in variants]
    skipped = {}
    if not args.no_hf:
        systems.append("transformers") if installed("transformers") else skipped.setdefault("transformers", "not installed")
    systems.append("llama.cpp") if installed("llama_cpp") else skipped.setdefault("llama.cpp", "llama-cpp-python not installed")
    if args.llama_server:
        systems.append("llama-server")
    # the user's environment as it is: OMP_WAIT_POLICY=PASSIVE (which the test suite sets) halves llama.cpp's
    # decode speed (ggml's OpenMP threads then sleep between operations) and attnkit's (its C kernels' too)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict = {}
    for i, name in enumerate(systems):
        print(f"[{i + 1}/{len(systems)}] {name} …", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", name, "--requests", str(args.requests), "--threads", str(args.threads),
               "--hf-batch", str(args.hf_batch), "--llama-slots", str(args.llama_slots)] + (
                   ["--quick"] if args.quick else []) + (["--llama-server", args.llama_server] if args.llama_server else [])
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            skipped[name] = f"failed (exit {r.returncode})"
            continue
        results[name] = json.loads(line[len("RESULT "):])

    print("| system | " + " | ".join(c[1] for c in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, res in results.items():
        print(f"| {name} | " + " | ".join(f"{res[k]:.{d}f}" if res.get(k) is not None else "—" for k, _, d in COLUMNS) + " |")
    for name, why in skipped.items():
        print(f"| {name} | {why} |")
    w = workload(args.quick, args.requests)
    report = {
        "results": results, "skipped": skipped,
        "workload": {"quick": args.quick, "requests": len(w["offline"]), "single_new_tokens": w["single_new"],
                     "offline_input_tokens": sum(len(p) for p, _ in w["offline"]),
                     "offline_output_tokens": sum(n for _, n in w["offline"]), "hf_batch": args.hf_batch},
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version(),
                    "threads": args.threads or "default", "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
    }
    keys = ("offline_out_tok_s", "decode_32_tok_s", "decode_512_tok_s", "prefill_512_tok_s")
    for peer in ("transformers", "llama.cpp", "llama-server"):
        if peer in results:
            report[f"ratio_vs_{peer}"] = {
                a: {k: results[a][k] / results[peer][k] for k in keys + ("peak_rss_mb",) if k in results[a] and k in results[peer]}
                for a in results if a.startswith("attnkit")}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
