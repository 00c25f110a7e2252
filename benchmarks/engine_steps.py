"""Where the engine's time goes on the offline workload of benchmarks/engine.py, by kind of step.

Each forward the model runner makes is timed and put in one of three kinds: a step with prefill chunks
(mixed with whatever decodes run beside them: the eager path, products of many rows dense), a decode-only
step the C decode step takes (all layers in one call: up to its ``max_rows`` sequences, 8 on GGUF's row
layout and 64 on interleaved blocks), and a larger decode-only step (eager, dense products). Prints a
table and the JSON (``--json FILE`` also writes it).

    python benchmarks/engine_steps.py [--requests 64] [--threads 2] [--matmul-dtype auto] [--json FILE]
    attnkit bench engine_steps
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

from engine import workload  # noqa: E402 (the same 64 requests as the engine benchmark)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from attnkit import LLM, SamplingParams

    llm = LLM(threads=args.threads, matmul_dtype=args.matmul_dtype)
    llm.generate([list(range(1, 40))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    runner = llm.engine.runner
    kinds: dict[str, dict[str, float]] = {}
    run = runner.run

    def timed(batch):
        t = time.perf_counter()
        out = run(batch)
        dt = time.perf_counter() - t
        decode = all(n == 1 for n in batch.num_tokens)
        limit = runner.native.max_rows if runner.native else 0
        kind = (f"decode, <= {limit} sequences (C step)" if len(batch.seqs) <= limit else
                f"decode, > {limit} sequences (eager)") if decode else "with prefill"
        k = kinds.setdefault(kind, {"steps": 0, "seconds": 0.0, "tokens": 0})
        k["steps"] += 1
        k["seconds"] += dt
        k["tokens"] += sum(batch.num_tokens)
        return out

    runner.run = timed
    reqs = workload(False, args.requests)["offline"]
    t = time.perf_counter()
    llm.generate([p for p, _ in reqs], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs])
    total = time.perf_counter() - t
    out_tokens = sum(n for _, n in reqs)
    print(f"offline: {len(reqs)} requests, {total:.1f} s, {out_tokens / total:.1f} out tok/s "
          f"(matmul_dtype {args.matmul_dtype})")
    print("| step | steps | seconds | share | tokens | tok/s | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for name, k in kinds.items():
        print(f"| {name} | {k['steps']} | {k['seconds']:.1f} | {k['seconds'] / total:.0%} | {k['tokens']} | "
              f"{k['tokens'] / k['seconds']:.0f} | {k['seconds'] / k['steps'] * 1e3:.1f} |")
    report = {"total_s": total, "out_tok_s": out_tokens / total, "kinds": kinds, "matmul_dtype": args.matmul_dtype,
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "threads": args.threads,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
