"""Fine-tuning speed and memory: attnkit against HF PEFT on the same model, data and steps, and QLoRA at 1B.

``peft`` — LoRA r=16 on every linear layer of the default SmolLM2-135M: attnkit's ``finetune()`` (in its default
precision — bf16 autocast where the CPU multiplies bf16 in hardware, else float32 — or the one ``--precision``
names) and transformers + HF PEFT on the same weights (the default model written as an HF directory) in float32,
its default, and under bf16 autocast (``--peft-precisions``); the same packed rows of English prose (Python's
standard-library docstrings), the same micro-batches in the same order (attnkit.train.sft_data), AdamW, learning
rate, clipping and steps. Each system runs in a fresh process; reported: training tokens/s (over all steps), peak
RSS, held-out loss after, and attnkit's ratios to each PEFT run.

``qlora`` — LoRA r=16 on every linear layer over a GGUF base that stays quantized (``--gguf``, e.g. the
Llama-3.2-1B-shaped Q4_K_M that benchmarks/sizes.py writes): tokens/s and peak RSS against the file's size, also
less the runtime (the child's RSS with Python, PyTorch and attnkit imported, before anything is loaded); in attnkit's
default precision (bf16 tiles where the CPU multiplies bf16 in hardware), with gradient checkpointing, with it in
float32, and with it under glibc's own malloc policy (``ATTNKIT_NO_MALLOC_TUNING=1``) in place of the one a quantized
base's training sets.

    python benchmarks/finetune_speed.py --parts peft,qlora --gguf ~/.cache/attnkit/sizes/llama-3.2-1b-Q4_K_M.lq.gguf
    attnkit bench finetune_speed -- --parts peft --steps 30

Goals (issue 19): tokens/s ≥ 1.5× HF PEFT, peak RSS ≤ 0.6×, final eval loss within 2%; QLoRA peak RSS ≤ 1.5× the
file + activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    from attnkit.data.text_corpus import docstring_paragraphs

    train, held = path / "train.jsonl", path / "eval.jsonl"
    for file, split, n in ((train, "train", n_train), (held, "test", n_eval)):
        file.write_text("".join(json.dumps({"text": t}) + "\n" for t in docstring_paragraphs(split, n)))
    return train, held


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)


def child_attnkit(a: dict) -> dict:
    """attnkit's own trainer, as ``attnkit finetune`` runs it."""
    import torch

    from attnkit.train.finetune import FinetuneArgs, finetune

    torch.set_num_threads(a["threads"])
    fa = FinetuneArgs(method="lora", data=a["train"], eval_data=a["eval"], model=a.get("model"),
                      quantize=a.get("quantize"), steps=a["steps"], batch_size=a["batch"], seq_len=a["seq_len"],
                      packing=True, lr=a["lr"], warmup=0, schedule="constant", r=16, alpha=32.0,
                      target_modules="all-linear", eval_every=0, bf16=a["bf16"],  # None: attnkit's default
                      gradient_checkpointing=a.get("checkpointing", False), seed=0)
    runtime = current_rss_mb()  # Python, PyTorch and attnkit imported, nothing loaded
    t0 = time.perf_counter()
    res = finetune(fa, a["out"], progress=False)
    wall = time.perf_counter() - t0
    hist = json.loads((Path(a["out"]) / "checkpoint" / "trainer_state.json").read_text())["history"]
    ran = json.loads((Path(a["out"]) / "finetune_args.json").read_text())
    return {"bf16": ran["bf16"], "train_seconds": res["train_seconds"], "wall_s": round(wall, 1),
            "eval_loss": res["eval_after"]["eval_loss"],
            "final_train_loss": hist[-1]["loss"], "peak_rss_mb": round(peak_rss_mb()), "runtime_rss_mb": round(runtime),
            "tokens": sum(h["tokens"] for h in hist), "rows": res["train_examples"]}


def child_peft(a: dict) -> dict:
    """transformers' LlamaForCausalLM + HF PEFT, fed the same micro-batches through the same loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from attnkit.text.tokenizer import Tokenizer
    from attnkit.train.finetune import lm_loss
    from attnkit.train.sft_data import IGNORE, collate, load_examples, micro_batches, pack

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    tok = Tokenizer.from_dir(a["hf_dir"])
    pad = min(a["eos_ids"])
    rows = pack(load_examples(a["train"], tok, a["seq_len"]), a["seq_len"])
    held = load_examples(a["eval"], tok, a["seq_len"])
    model = AutoModelForCausalLM.from_pretrained(a["hf_dir"], torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a["lr"], weight_decay=0.0)
    data = micro_batches(rows, a["batch"], pad, 0)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if a["bf16"] else torch.autocast("cpu", enabled=False)
    model.train()
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        x, y = next(data)
        with ctx:
            logits = model(input_ids=x).logits  # packed rows: no padding
        loss = lm_loss(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 8):
            x, y = collate(held[i:i + 8], pad)
            total += float(lm_loss(model(input_ids=x).logits, y, reduction="sum"))
            count += int((y[:, 1:] != IGNORE).sum())
    return {"train_seconds": round(train_s, 1), "eval_loss": total / count, "final_train_loss": float(loss),
            "peak_rss_mb": round(peak_rss_mb()), "tokens": a["steps"] * a["batch"] * a["seq_len"], "rows": len(rows)}


def run_child(kind: str, a: dict, timeout: float, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-args", json.dumps(a)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def export_default_hf(work: Path) -> tuple[Path, list[int]]:
    from attnkit.loading import load_causal_lm
    from attnkit.train.hf_export import save_hf_llama

    lm = load_causal_lm(None)
    d = work / "smollm2-hf"
    if not (d / "model.safetensors").exists():
        save_hf_llama(lm.model, lm.tokenizer, d)
    return d, sorted(lm.tokenizer.eos_ids or {0})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="peft,qlora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=("default", "float32", "bf16"), default="default",
                    help="attnkit's: its default (bf16 autocast on bf16 hardware) or the one named")
    ap.add_argument("--peft-precisions", default="float32,bf16",
                    help="HF PEFT's runs: float32 (its default) and/or bf16 (autocast)")
    ap.add_argument("--gguf", default=None, help="QLoRA base: a GGUF file (skipped when absent)")
    ap.add_argument("--qlora-steps", type=int, default=4)
    ap.add_argument("--qlora-batch", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--omp-wait-policy", choices=("unset", "PASSIVE", "ACTIVE"), default="unset",
                    help="OMP_WAIT_POLICY for both systems' processes; unset: the OpenMP runtime's own (as a user runs "
                         "them: threads spin a while between parallel regions)")
    ap.add_argument("--json", default="docs/results/finetune_speed.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        a = json.loads(args.child_args)
        print(json.dumps({"attnkit": child_attnkit, "peft": child_peft}[args.child](a)))
        return 0

    parts = args.parts.split(",")
    if args.omp_wait_policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                "python": platform.python_version(), "omp_wait_policy": args.omp_wait_policy},
                    "parts": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, held = write_data(work, 400, 40)
        base = {"train": str(train), "eval": str(held), "steps": args.steps, "batch": args.batch_size,
                "seq_len": args.seq_len, "lr": args.lr, "threads": args.threads,
                "bf16": {"default": None, "float32": False, "bf16": True}[args.precision]}
        if "peft" in parts:
            hf_dir, eos = export_default_hf(work)
            ours = run_child("attnkit", {**base, "out": str(work / "run-attnkit")}, args.timeout)
            peers = {prec: run_child("peft", {**base, "bf16": prec == "bf16", "hf_dir": str(hf_dir), "eos_ids": eos},
                                     args.timeout) for prec in args.peft_precisions.split(",")}
            label = "attnkit" + ("" if "error" in ours else f" ({'bf16' if ours['bf16'] else 'float32'})")
            for name, r in ((label, ours), *((f"HF PEFT ({prec})", r) for prec, r in peers.items())):
                if "error" not in r:  # the tokens of the data trained on, not the padding
                    r["tokens_per_s"] = round(r["tokens"] / r["train_seconds"], 1)
                rows.append(("135M LoRA r16 all-linear", name, r))
            part: dict = {"attnkit": ours, "peft": peers, "against": {}}
            for prec, peer in peers.items():
                if "error" not in ours and "error" not in peer:
                    part["against"][prec] = {
                        "speed_ratio": round(ours["tokens_per_s"] / peer["tokens_per_s"], 2),
                        "rss_ratio": round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 2),
                        "eval_loss_change": round(ours["eval_loss"] / peer["eval_loss"] - 1, 4)}
            report["parts"]["peft"] = part
        if "qlora" in parts:
            if not args.gguf or not Path(args.gguf).exists():
                print(f"qlora: skipped, no GGUF base at {args.gguf!r} (--gguf)", file=sys.stderr)
            else:
                q = {**base, "model": args.gguf, "steps": args.qlora_steps, "batch": args.qlora_batch}
                size_mb = Path(args.gguf).stat().st_size / 2**20
                out = {}
                # the last: glibc's own policy (its mmap threshold rising as blocks are freed) in place of the one
                # a quantized base's training sets (attnkit.kernels.allocator.return_freed_memory)
                for label, extra, env in (("quantized base (gguf)", {"quantize": "gguf"}, None),
                                          ("+ gradient checkpointing", {"quantize": "gguf", "checkpointing": True}, None),
                                          ("+ checkpointing, float32 (--no-bf16)",
                                           {"quantize": "gguf", "checkpointing": True, "bf16": False}, None),
                                          ("+ checkpointing, glibc's own malloc policy", {"quantize": "gguf", "checkpointing": True},
                                           {"ATTNKIT_NO_MALLOC_TUNING": "1"})):
                    r = run_child("attnkit", {**q, **extra, "out": str(work / f"run-q{len(out)}")}, args.timeout, env)
                    if "error" not in r:
                        r["tokens_per_s"] = round(r["tokens"] / r["train_seconds"], 1)
                        r["rss_over_file"] = round(r["peak_rss_mb"] / size_mb, 2)
                        r["rss_less_runtime_over_file"] = round((r["peak_rss_mb"] - r["runtime_rss_mb"]) / size_mb, 2)
                    out[label] = r
                    rows.append((f"{Path(args.gguf).name} QLoRA", label, r))
                report["parts"]["qlora"] = {"file": args.gguf, "file_mb": round(size_mb), "runs": out,
                                            "batch": q["batch"], "seq_len": q["seq_len"], "steps": q["steps"]}
    print(f"{'workload':<42} {'system':<26} {'tok/s':>8} {'peak RSS MB':>12} {'eval loss':>10}")
    for w, name, r in rows:
        if "error" in r:
            print(f"{w:<42} {name:<26} error: {r['error']}")
        else:
            print(f"{w:<42} {name:<26} {r['tokens_per_s']:>8} {r['peak_rss_mb']:>12} {r['eval_loss']:>10.4f}")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
