"""Does the encoder–decoder learn? Train the Transformer and the LSTM baseline on generated tasks.

For each (model, task) it trains with the same data, batch size, steps and schedule, then reports
held-out exact-match sequence accuracy (greedy, and beam 4 for the Transformer), parameters and
training time. Prints a table, writes JSON (and keeps each checkpoint under --runs).

    python benchmarks/seq2seq_tasks.py                        # reverse + dates, Transformer and LSTM
    python benchmarks/seq2seq_tasks.py --tasks numbers --models transformer
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

import torch  # noqa: E402

from attnkit.train.seq2seq import TrainArgs, train  # noqa: E402

# One recipe for every task and both models: 2 + 2 layers of width 128 (about 0.9 M parameters for the
# Transformer), with the paper's regularisation (dropout 0.1, label smoothing 0.1).
RECIPE = dict(d_model=128, n_heads=4, n_layers=2, d_ff=512, dropout=0.1, batch_size=64, warmup=400,
              lr_factor=0.5, label_smoothing=0.1, eval_examples=1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["reverse", "dates"])
    p.add_argument("--models", nargs="+", default=["transformer", "lstm"], choices=["transformer", "lstm"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", default="runs/seq2seq_tasks", help="checkpoint directories go here")
    p.add_argument("--out-json", default="docs/results/seq2seq_tasks.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for task in args.tasks:
        for model in args.models:
            targs = TrainArgs(task=task, model=model, steps=args.steps, **RECIPE)
            print(f"== {model} on {task}", file=sys.stderr)
            r = train(targs, Path(args.runs) / f"{model}_{task}", progress=sys.stderr.isatty())
            rows.append({
                "task": task, "model": model, "parameters": r["parameters"], "steps": r["steps"],
                "train_seconds": r["train_seconds"], "final_loss": r["final_loss"],
                "greedy_exact": r["greedy"]["exact_match"],
                "beam4_exact": r.get("beam4", {}).get("exact_match"),
            })

    header = ["task", "model", "params", "steps", "train s", "greedy exact", "beam-4 exact"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        beam = "—" if r["beam4_exact"] is None else f"{r['beam4_exact']:.1%}"
        print(f"| {r['task']} | {r['model']} | {r['parameters']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
              f"{r['greedy_exact']:.1%} | {beam} |")
    result = {
        "recipe": RECIPE, "steps": args.steps, "threads": args.threads, "rows": rows,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d")},
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
