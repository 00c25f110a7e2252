"""Batched decode: output tok/s of B sequences generating together, attnkit against llama.cpp's
``llama-batched-bench`` on the same GGUF, B = 1, 2, 4, … (a server with B users at once).

Each system gets B sequences of ``--prompt`` random token ids (a different prompt each) and generates ``--new``
tokens for every one, greedy, on ``--threads`` threads. attnkit: ``LLM.generate`` on the B prompts at once; the
figure is B·(new − 1) tokens over the time from the last sequence's first token to the last one's finish (the
steps where all B decode together). llama.cpp: ``llama-batched-bench -npp P -ntg N -npl B`` (its ``speed_tg``:
B·N tokens over its generation time). Each system runs in a fresh process per round, the systems in turn; with
``--rounds R`` each figure is the median over the rounds. A missing llama.cpp is skipped, and said so.

    python benchmarks/batch_decode.py --model ~/.cache/attnkit/sizes/llama-3.2-1b-Q4_K_M.lq.gguf \\
        --batches 1,2,4,8,16,32 --llama-bin /opt/llama.cpp/bin [--rounds 2] [--json FILE]
    attnkit bench batch_decode -- --model FILE --llama-bin DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model, median_result, write_report  # noqa: E402


def child_attnkit(model: str, batches: list[int], prompt: int, new: int, threads: int) -> dict:
    """tok/s per batch size B, in this process (the parent runs it in a fresh one)."""
    import random

    from attnkit import LLM, SamplingParams

    llm = LLM(model, threads=threads)
    rng = random.Random(0)
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate([[rng.randrange(1000, 40000) for _ in range(prompt)]], SamplingParams(temperature=0, max_tokens=4))
    out = {}
    for B in batches:
        prompts = [[rng.randrange(1000, 40000) for _ in range(prompt)] for _ in range(B)]
        res = llm.generate(prompts, [sp] * B)
        t0 = max(o.metrics.first_token_time for o in res)
        t1 = max(o.metrics.finish_time for o in res)
        out[str(B)] = B * (new - 1) / (t1 - t0)
    return out


def run_llama(binary: Path, model: str, batches: list[int], prompt: int, new: int, threads: int,
              timeout: float) -> dict:
    """llama-batched-bench's speed_tg per batch size (its jsonl output)."""
    cmd = [str(binary), "-m", model, "-t", str(threads), "-c", str(max(batches) * (prompt + new) + 64),
           "-npp", str(prompt), "-ntg", str(new), "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout) else "failed"}
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[str(r["pl"])] = r["speed_tg"]
    return out


def run_child(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batches", args.batches, "--prompt",
           str(args.prompt), "--new", str(args.new), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def median_by_batch(rounds: list[dict], batches: list[int]) -> dict:
    """Each batch size's median over the rounds that measured it (rounds with an error left out)."""
    good = [r for r in rounds if "error" not in r]
    med = median_result(good) if good else {}
    return {str(B): med[str(B)] for B in batches if str(B) in med}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded default model)")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-bin", default=None, help="llama.cpp's bin directory (llama-batched-bench)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from attnkit.loading.defaults import default_chat_model

        args.model = str(default_chat_model())
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child_attnkit(args.model, batches, args.prompt, args.new, args.threads)))
        return 0

    llama = Path(args.llama_bin) / "llama-batched-bench" if args.llama_bin else None
    if llama is None or not llama.exists():
        print(f"llama.cpp: skipped, no llama-batched-bench under {args.llama_bin!r} (--llama-bin)", file=sys.stderr)
        llama = None
    ours, theirs = [], []
    for i in range(args.rounds):
        print(f"round {i + 1} of {args.rounds}: attnkit …", file=sys.stderr)
        t = time.perf_counter()
        ours.append(run_child(args))
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if llama is not None:
            print(f"round {i + 1} of {args.rounds}: llama-batched-bench …", file=sys.stderr)
            theirs.append(run_llama(llama, args.model, batches, args.prompt, args.new, args.threads, args.timeout))
    a, b = median_by_batch(ours, batches), median_by_batch(theirs, batches)
    print(f"\n{Path(args.model).name}: {args.prompt}-token prompts, {args.new} new tokens each, greedy, "
          f"{args.threads} threads, median of {args.rounds} round(s)\n")
    print("| sequences | attnkit tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
    for B in batches:
        x, y = a.get(str(B)), b.get(str(B))
        cell = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {B} | {cell(x)} | {cell(y)} | {f'{x / y:.2f}×' if x and y else '—'} |")
    report = {"machine": {"cpu": cpu_model(), "processor": platform.machine(), "cpus": os.cpu_count(),
                          "threads": args.threads},
              "model": args.model, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
              "attnkit": {"tok_s": a, "rounds": ours},
              "llama.cpp": {"tok_s": b, "rounds": theirs} if llama is not None else {"skipped": "no llama-batched-bench"},
              "ratio": {k: a[k] / b[k] for k in a if k in b}}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
