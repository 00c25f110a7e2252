"""Does each PEFT method teach the default SmolLM2-135M a task it fails before?

The task (attnkit/data/sft_tasks.py): a product review → {"sentiment": ..., "topic": ...} in exactly
that JSON shape. Per method: fine-tune on generated chat examples (loss on the answer tokens only),
then greedy-decode held-out reviews and count exact matches. Reports held-out accuracy before/after,
the share of trainable parameters, training time and eval loss/perplexity; writes a loss-curve PNG
per method and merges its row into the JSON (so methods can run one at a time).

    python benchmarks/finetune.py --methods base lora adapter prefix prompt ptuning
    python benchmarks/finetune.py --methods distill     # progressive shrinking of the same model

``distill``: the student is SmolLM2 with layers dropped in stages (by Block Influence), distilled
from the full model on English prose (Python's standard-library docstrings) between stages; teacher
vs student held-out perplexity, parameters and greedy decode speed go to docs/results/finetune_distill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from attnkit.data import sft_tasks  # noqa: E402
from attnkit.loading import load_causal_lm  # noqa: E402
from attnkit.train.finetune import FinetuneArgs, finetune  # noqa: E402
from attnkit.train.sft_eval import task_accuracy  # noqa: E402

# one recipe per method: its usual learning-rate range, small sizes for a 2-core CPU
RECIPES: dict[str, dict] = {
    "lora": dict(lr=1e-3, r=8, alpha=16, target_modules="q_proj,k_proj,v_proj,o_proj"),
    "adapter": dict(lr=1e-3, bottleneck_size=32),
    "prefix": dict(lr=3e-3, num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=128),
    "prompt": dict(lr=3e-2, num_virtual_tokens=10,
                   prompt_init_text="Answer with JSON: sentiment positive or negative, topic food, electronics, travel or clothing."),
    "ptuning": dict(lr=3e-3, num_virtual_tokens=10, encoder_hidden_size=128),
    "ia3": dict(lr=3e-3),
    "full": dict(lr=5e-5),
}


DEFAULT_STEPS = 30


def run_distill(args: argparse.Namespace, lm, runs: Path) -> None:
    from attnkit.data.text_corpus import docstring_paragraphs
    from attnkit.train.distill import DistillArgs, distill

    train = sft_tasks.write_jsonl(runs / "prose_train.jsonl", [{"text": t} for t in docstring_paragraphs("train", 800)])
    test = sft_tasks.write_jsonl(runs / "prose_test.jsonl", [{"text": t} for t in docstring_paragraphs("test", 48)])
    da = DistillArgs(data=str(train), eval_data=str(test), stages=args.stages, steps_per_stage=args.steps_per_stage,
                     batch_size=4, seq_len=96, lr=1e-4, warmup=4, temperature=2.0, alpha=0.5)
    t0 = time.perf_counter()
    report = distill(da, runs / "distill", progress=sys.stderr.isatty(), lm=lm)
    report.pop("student")
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other processes), torch {torch.__version__}"
    out = Path(args.out_json).with_name("finetune_distill.json")
    out.write_text(json.dumps(report, indent=2))
    t = report["teacher"]
    print("| model | layers | params | held-out ppl | decode tok/s |\n|---|---|---|---|---|")
    print(f"| teacher | {t['layers']} | {t['params'] / 1e6:.1f} M | {t['eval_ppl']:.2f} | {t['decode_tok_s']:.1f} |")
    for s in report["stages"]:
        print(f"| student ({s['layers']} layers; ppl {s['eval_ppl_after_drop']:.1f} right after dropping) | {s['layers']} | "
              f"{s['params'] / 1e6:.1f} M | {s['eval_ppl']:.2f} | {s['decode_tok_s']:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["base", "lora", "adapter", "prefix", "prompt", "ptuning"],
                   choices=["base", "distill", *RECIPES])
    p.add_argument("--stages", default="24,18", help="distill: layer counts per stage")
    p.add_argument("--steps-per-stage", type=int, default=40)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="other step counts get rows of their own")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-n", type=int, default=600)
    p.add_argument("--eval-n", type=int, default=40, help="held-out reviews for accuracy")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", default="runs/finetune")
    p.add_argument("--out-json", default="docs/results/finetune.json")
    p.add_argument("--img-dir", default="docs/img")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    runs = Path(args.runs)
    train_file = sft_tasks.write_jsonl(runs / "train.jsonl",
                                       [sft_tasks.chat_row(r, l) for r, l in sft_tasks.examples("train", args.train_n)])
    eval_file = sft_tasks.write_jsonl(runs / "eval.jsonl",
                                      [sft_tasks.chat_row(r, l) for r, l in sft_tasks.examples("test", 48, seed=1)])
    heldout = sft_tasks.examples("test", args.eval_n)
    out_json = Path(args.out_json)
    results = json.loads(out_json.read_text()) if out_json.exists() else {"rows": {}}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other processes), torch {torch.__version__}"
    results["task"] = "review → {\"sentiment\", \"topic\"} JSON (attnkit/data/sft_tasks.py); loss on the answer tokens only"

    for method in args.methods:
        print(f"== {method}", file=sys.stderr)
        lm = load_causal_lm(None)
        if method == "distill":
            run_distill(args, lm, runs)
            continue
        key = method
        if method == "base":
            acc = task_accuracy(lm.model, lm.tokenizer, lm.stop_ids, heldout, sft_tasks.prompt_messages,
                                sft_tasks.score, max_new_tokens=24)
            results["rows"]["base"] = {"method": "base (no fine-tuning)", "heldout_accuracy": acc["accuracy"], "heldout_n": acc["n"],
                                       "valid_json": acc["valid_format"], "samples": acc["samples"]}
        else:
            fa = FinetuneArgs(method=method, data=str(train_file), eval_data=str(eval_file), steps=args.steps,
                              batch_size=args.batch_size, warmup=max(1, args.steps // 10), eval_every=args.steps // 2,
                              seq_len=128, **RECIPES[method])
            t0 = time.perf_counter()
            r = finetune(fa, runs / method, lm=lm, progress=sys.stderr.isatty())
            wall = time.perf_counter() - t0
            acc = task_accuracy(r["model"], lm.tokenizer, lm.stop_ids, heldout, sft_tasks.prompt_messages,
                                sft_tasks.score, max_new_tokens=24)
            suffix = "" if args.steps == DEFAULT_STEPS else f"_{args.steps}steps"
            img = Path(args.img_dir) / f"finetune_{method}{suffix}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(runs / method / "loss_curve.png", img)
            key = method if args.steps == DEFAULT_STEPS else f"{method} ({args.steps} steps)"
            results["rows"][key] = {
                "method": method, "recipe": RECIPES[method], "steps": args.steps, "batch_size": args.batch_size,
                "heldout_accuracy": acc["accuracy"], "heldout_n": acc["n"],
                "valid_json": acc["valid_format"], "trainable_params": r["trainable_params"],
                "total_params": r["total_params"], "trainable_percent": round(r["trainable_percent"], 4),
                "train_seconds": r["train_seconds"], "wall_seconds_incl_eval": round(wall, 1),
                "eval_loss_before": round(r["eval_before"]["eval_loss"], 4), "eval_loss_after": round(r["eval_after"]["eval_loss"], 4),
                "eval_ppl_before": round(r["eval_before"]["eval_ppl"], 3), "eval_ppl_after": round(r["eval_after"]["eval_ppl"], 3),
                "samples": acc["samples"], "loss_curve": str(img),
            }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in results["rows"][key].items() if k != "samples"}), file=sys.stderr)

    header = ["method", "trainable %", "train s", "eval ppl before → after", "held-out acc", "valid JSON"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    base = results["rows"].get("base")
    for key, r in results["rows"].items():
        if key == "base":
            print(f"| base (no fine-tuning) | 0 | — | — | {r['heldout_accuracy']:.1%} | {r['valid_json']:.1%} |")
            continue
        print(f"| {key} | {r['trainable_percent']:.3f} | {r['train_seconds']:.0f} | "
              f"{r['eval_ppl_before']:.2f} → {r['eval_ppl_after']:.3f} | {r['heldout_accuracy']:.1%} | {r['valid_json']:.1%} |")
    if base is None:
        print("(run --methods base for the before-accuracy)", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
