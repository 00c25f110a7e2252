"""Where the time of one single-stream decode step goes, by operation (issue: CPU speed).

Runs the engine on the default model (``--quantize``, default gguf), decodes a warm-up, then profiles
``--steps`` decode steps with torch.profiler. attnkit's C kernels are called through ctypes, which
the profiler cannot see, so this script (only this script) wraps them in ``record_function`` labels:
``attnkit::gguf_block_product`` and ``attnkit::paged_attention``. Prints a table (self CPU time per
step, by operation) and the JSON (``--json FILE`` also writes it).

    python benchmarks/decode_profile.py [--quantize gguf|none|auto] [--threads N] [--steps 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", default="gguf", help="gguf | auto | int8 | int4 | none")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rows", type=int, default=15, help="operations shown")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from torch.profiler import profile, record_function

    from attnkit import LLM, SamplingParams
    from attnkit.engine import paged_attention
    from attnkit.quant import native

    if args.threads:
        torch.set_num_threads(args.threads)

    def labelled(fn, label):
        def wrapper(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)
        return wrapper

    native.GGUFBlockLinear.forward = labelled(native.GGUFBlockLinear.forward, "attnkit::gguf_block_product")
    paged_attention.paged_decode_attention_native = labelled(paged_attention.paged_decode_attention_native,
                                                             "attnkit::paged_attention")
    llm = LLM(quantize=None if args.quantize == "none" else args.quantize)
    eng = llm.engine
    eng.add_request(list(range(1000, 1032)), SamplingParams(max_tokens=16 + args.steps, temperature=0, ignore_eos=True))
    for _ in range(16):  # prefill + warm-up decodes
        eng.step()
    t0, c0 = time.perf_counter(), time.process_time()
    with profile() as prof:
        for _ in range(args.steps):
            eng.step()
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    table = [{"op": e.key, "calls_per_step": e.count / args.steps, "self_ms_per_step": e.self_cpu_time_total / args.steps / 1e3,
              "share": e.self_cpu_time_total / total} for e in rows]
    print(f"decode step (profiled): {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU; profiled ops "
          f"{total / args.steps / 1e3:.1f} ms; quantize={args.quantize}, threads={torch.get_num_threads()}")
    print("| operation | calls / step | self ms / step | share |")
    print("|---|---|---|---|")
    for r in table[: args.rows]:
        print(f"| {r['op']} | {r['calls_per_step']:.0f} | {r['self_ms_per_step']:.2f} | {r['share']:.1%} |")
    rest = table[args.rows:]
    print(f"| (other {len(rest)} operations) | {sum(r['calls_per_step'] for r in rest):.0f} | "
          f"{sum(r['self_ms_per_step'] for r in rest):.2f} | {sum(r['share'] for r in rest):.1%} |")
    report = {"quantize": args.quantize, "threads": torch.get_num_threads(), "steps": args.steps,
              "step_ms_wall": wall * 1e3, "step_ms_cpu": cpu * 1e3, "ops": table,
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
