"""Decode with the weight blocks on 2 MiB pages against 4 KiB pages, and llama.cpp, alternating in the same run.

attnkit keeps the blocks its kernels stream every decode step on transparent huge pages
(attnkit.quant.weight_memory); ``ATTNKIT_HUGE_PAGES=0`` puts them on the ordinary heap. Each round runs, each in a
fresh process on ``--threads`` threads: attnkit with huge pages, attnkit without, and ``llama-bench -n TOKENS``
on the same file (when ``--llama-bin`` has it; skipped, saying so, otherwise). attnkit's decode is measured as
benchmarks/sizes.py measures it: greedy, ``--tokens`` new tokens after a 32-token random prompt, (n − 1) / (last
token − first token), best of ``--reps`` requests. A shared machine's speed drifts by tens of percent over minutes,
so the configurations alternate round by round and the table gives each one's median over the rounds and the
per-round ratios. Also reported: the process's AnonHugePages (how much of it the kernel put on huge pages).

    python benchmarks/huge_pages.py [--gguf FILE ...] [--llama-bin DIR] [--rounds 3] [--json FILE]
    attnkit bench huge_pages -- --gguf ~/.cache/attnkit/sizes/llama-3.2-1b-Q4_K_M.lq.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model, write_report  # noqa: E402


def child(path: str, tokens: int, reps: int, threads: int) -> int:
    import random

    from attnkit import LLM, SamplingParams

    llm = LLM(path, threads=threads)
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([list(range(1000, 1040))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    rng, vocab, best = random.Random(0), llm.engine.vocab_size, 0.0
    for _ in range(reps):
        m = llm.generate([[rng.randrange(vocab) for _ in range(32)]], greedy)[0].metrics
        best = max(best, (tokens - 1) / (m.finish_time - m.first_token_time))
    huge = next((int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
                 if line.startswith("AnonHugePages")), None) if Path("/proc/self/smaps_rollup").exists() else None
    print("RESULT " + json.dumps({"decode_tok_s": best, "anon_huge_mb": None if huge is None else huge / 1024}))
    return 0


def run_attnkit(path: Path, args, huge: bool) -> dict:
    env = {**os.environ, "ATTNKIT_HUGE_PAGES": "1" if huge else "0"}
    cmd = [sys.executable, __file__, "--child", str(path), "--tokens", str(args.tokens), "--reps", str(args.reps),
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": p.stderr[-400:]}


def run_llama(path: Path, args) -> dict:
    exe = Path(args.llama_bin or "") / "llama-bench"
    if not args.llama_bin or not exe.exists():
        return {"skipped": f"llama-bench not found in --llama-bin {args.llama_bin}"}
    p = subprocess.run([str(exe), "-m", str(path), "-t", str(args.threads), "-p", "0", "-n", str(args.tokens),
                        "-r", str(args.reps), "-o", "json"], capture_output=True, text=True, timeout=900)
    try:
        return {"decode_tok_s": float(json.loads(p.stdout)[0]["avg_ts"])}
    except (ValueError, KeyError, IndexError):
        return {"error": p.stderr[-400:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="+", default=[])
    ap.add_argument("--llama-bin", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.reps, args.threads)
    if not args.gguf:  # the embedded default model
        from attnkit.loading.defaults import default_chat_model

        args.gguf = [str(default_chat_model())]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    report: dict = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
                                "transparent_hugepage": thp.read_text().strip() if thp.exists() else None},
                    "rounds": args.rounds, "tokens": args.tokens, "reps": args.reps, "models": []}
    print(f"| model | round | attnkit 2 MiB pages | attnkit 4 KiB pages | llama.cpp | huge ÷ 4 KiB | huge ÷ llama.cpp |\n"
          "|---|---|---|---|---|---|---|")
    for f in map(Path, args.gguf):
        rounds = []
        for r in range(args.rounds):
            row = {"huge": run_attnkit(f, args, True), "small": run_attnkit(f, args, False), "llama": run_llama(f, args)}
            rounds.append(row)
            v = {k: row[k].get("decode_tok_s") for k in row}
            ratio = lambda a, b: f"{v[a] / v[b]:.2f}" if v[a] and v[b] else "—"  # noqa: E731
            cell = lambda k: f"{v[k]:.2f}" if v[k] else row[k].get("skipped", "error")  # noqa: E731
            print(f"| {f.name} | {r + 1} | {cell('huge')} | {cell('small')} | {cell('llama')} | {ratio('huge', 'small')} | "
                  f"{ratio('huge', 'llama')} |", flush=True)
        med = {k: statistics.median(x[k]["decode_tok_s"] for x in rounds) if all("decode_tok_s" in x[k] for x in rounds)
               else None for k in ("huge", "small", "llama")}
        fmt = lambda k: f"{med[k]:.2f}" if med[k] else "—"  # noqa: E731
        both = lambda a, b: f"{med[a] / med[b]:.2f}" if med[a] and med[b] else "—"  # noqa: E731
        print(f"| {f.name} | median | {fmt('huge')} | {fmt('small')} | {fmt('llama')} | {both('huge', 'small')} | "
              f"{both('huge', 'llama')} |")
        report["models"].append({"model": f.name, "rounds": rounds, "median_decode_tok_s": med})
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
