"""Cold start of the default model: load + first token, attnkit vs HF transformers, same GGUF, same run.

Each measurement runs in a fresh Python process (nothing cached in memory but the OS page cache,
which the first, discarded run warms for both). Prints a table and JSON.

    python benchmarks/load.py [--runs 3] [--threads N] [--no-hf] [--out-json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ATTNKIT = r"""
import json, time
t0 = time.perf_counter()
import torch
if {threads}: torch.set_num_threads({threads})
from attnkit.loading import load_causal_lm
from attnkit.decoding.generate import SamplingParams, generate
t1 = time.perf_counter()
lm = load_causal_lm()
t2 = time.perf_counter()
it = generate(lm.model, lm.tokenizer.encode("Once upon a time"), SamplingParams(max_new_tokens=33))
next(it)
t3 = time.perf_counter()
n = sum(1 for _ in it)
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_token_s=t3 - t2, load_plus_first_s=t3 - t1,
                      decode_tok_s=n / (t4 - t3))))
"""

TRANSFORMERS = r"""
import json, os, time
os.environ["HF_HUB_OFFLINE"] = "1"
t0 = time.perf_counter()
import torch, transformers
if {threads}: torch.set_num_threads({threads})
from attnkit.loading.defaults import default_chat_model
t1 = time.perf_counter()
p = default_chat_model()
tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
t2 = time.perf_counter()
ids = tok("Once upon a time", return_tensors="pt").input_ids
with torch.no_grad():
    model(ids).logits[:, -1].argmax(-1)
t3 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_token_s=t3 - t2, load_plus_first_s=t3 - t1)))
"""


def measure(code: str, runs: int, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = []
    for _ in range(runs + 1):  # the first run warms the page cache and is dropped
        r = subprocess.run([sys.executable, "-c", code.format(threads=threads)], capture_output=True, text=True,
                           env=env, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"benchmark child failed:\n{r.stderr[-2000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--out-json", default="docs/results/load.json")
    args = ap.parse_args()

    results = {"attnkit": measure(ATTNKIT, args.runs, args.threads)}
    if not args.no_hf:
        results["transformers"] = measure(TRANSFORMERS, args.runs, args.threads)

    print("| engine | import s | load s | first token s | load + first token s (median) | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[name] = med
        dec = f"{med['decode_tok_s']:.1f}" if "decode_tok_s" in med else "—"
        print(f"| {name} | {med['import_s']:.2f} | {med['load_s']:.2f} | {med['first_token_s']:.2f} | "
              f"{med['load_plus_first_s']:.2f} | {dec} |")
    report = {"runs": results, "median": summary, "threads": args.threads or "default",
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()}}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
