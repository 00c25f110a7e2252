"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", §2)
and progressive shrinking of a causal LM.

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, y)

The soft targets at temperature T carry the teacher's relative probabilities of wrong answers; their
gradients scale as 1/T², hence the T² (§2.1). Progressive shrinking: the student is the teacher with
layers dropped (:mod:`attnkit.train.shrink`), a few at a time; after each stage it is distilled from
the original teacher before the next layers go. Reported per stage: held-out perplexity, parameters and
greedy decode speed of teacher and student. Under ``torchrun`` each stage trains the student with DDP, or with
FSDP2 (``fsdp``: the student's parameters, gradients and AdamW state sharded over the ranks; the teacher stays
whole on each) (:mod:`attnkit.train.distributed`: each rank a slice of the global batch, the loss normalised by
the global count of labelled tokens); rank 0 chooses the layers, measures decode speed and writes.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.json_config import JsonConfig
from ..decoding.generate import SamplingParams, generate
from .distributed import copy_full_weights, init_distributed, wrap
from .finetune import autocast, evaluate_loss, lr_factor
from .sft_data import IGNORE, collate, load_examples, micro_batches
from .shrink import block_influence, by_importance, drop_layers, evenly_kept, param_count


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0,
                 alpha: float = 0.5, tokens: float | None = None) -> torch.Tensor:
    """Hinton et al.'s loss over the positions whose next-token label is not −100; logits (B, T, V).
    ``tokens``: divide the sums by this count (data parallel: the global batch's) instead of this batch's own."""
    keep = labels[:, 1:] != IGNORE  # (B, T−1)
    s = student[:, :-1][keep].float()  # (N, V)
    t = teacher[:, :-1][keep].float()
    if tokens is None:
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                        reduction="batchmean")
        hard = F.cross_entropy(s, labels[:, 1:][keep])
    else:
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                        reduction="sum") / max(tokens, 1.0)
        hard = F.cross_entropy(s, labels[:, 1:][keep], reduction="sum") / max(tokens, 1.0)
    return alpha * soft * temperature ** 2 + (1 - alpha) * hard


@dataclass
class DistillArgs(JsonConfig):
    data: str = ""
    eval_data: str | None = None
    eval_fraction: float = 0.1
    model: str | None = None  # the teacher; None = the embedded default model
    stages: str = "half"  # comma-separated layer counts, e.g. "24,18", or "half"
    selection: str = "importance"  # importance | every-other
    steps_per_stage: int = 50
    batch_size: int = 4
    lr: float = 1e-4
    warmup: int = 5
    temperature: float = 2.0
    alpha: float = 0.5
    seq_len: int = 128
    seed: int = 0
    speed_tokens: int = 64
    dist_timeout: float = 300.0  # under torchrun: seconds a collective may wait for the other ranks
    fsdp: bool = False  # under torchrun: FSDP2 (the student's parameters, gradients and optimizer state sharded)

    def __post_init__(self) -> None:
        if self.selection not in ("importance", "every-other"):
            raise ValueError(f"selection must be 'importance' or 'every-other', got {self.selection!r}")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError("temperature must be > 0 and alpha in [0, 1]")
        if not self.data:
            raise ValueError("data: a JSONL file is required")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")

    def stage_sizes(self, n_layers: int) -> list[int]:
        sizes = [n_layers // 2] if self.stages == "half" else [int(s) for s in self.stages.split(",") if s.strip()]
        if not sizes or any(b >= a for a, b in zip([n_layers, *sizes], sizes)) or sizes[-1] < 1:
            raise ValueError(f"stages must be decreasing layer counts below {n_layers}, got {self.stages!r}")
        return sizes


@torch.inference_mode()
def decode_speed(model: Any, prompt: list[int], n: int) -> float:
    """Greedy decode tokens per second (single stream, KV cache), after one warm-up run."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    list(generate(model, prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    t0 = time.perf_counter()
    got = len(list(generate(model, prompt, params)))
    return got / (time.perf_counter() - t0)


def distill(args: DistillArgs, out_dir: str | Path, progress: bool = True, lm: Any = None) -> dict:
    """Shrink the teacher stage by stage with distillation; returns (and writes) the report."""
    from ..loading import load_causal_lm

    d = init_distributed(args.dist_timeout)
    fsdp = args.fsdp and d.on
    torch.manual_seed(args.seed)
    out = Path(out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    lm = load_causal_lm(args.model) if lm is None else lm
    teacher, tok = lm.model.eval().requires_grad_(False), lm.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else min(tok.eos_ids or {0})
    rows = load_examples(args.data, tok, args.seq_len)
    if args.eval_data:
        eval_rows = load_examples(args.eval_data, tok, args.seq_len)
    else:
        n_eval = max(1, int(len(rows) * args.eval_fraction))
        rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    prompt = eval_rows[0][0][:16]
    report: dict[str, Any] = {"args": args.to_dict(), "teacher": {
        "layers": len(teacher.layers), "params": param_count(teacher),
        "eval_ppl": evaluate_loss(teacher, eval_rows, pad, d=d)["eval_ppl"],
        "decode_tok_s": decode_speed(teacher, prompt, args.speed_tokens) if d.main else None}, "stages": []}
    student = teacher
    batches = micro_batches(rows, args.batch_size, pad, args.seed, rank=d.rank, world=d.world)
    for n_keep in args.stage_sizes(len(teacher.layers)):
        if args.selection == "importance":  # rank 0 chooses; every rank drops the same layers
            keep_t = torch.zeros(n_keep, dtype=torch.int64)
            if d.main:
                scores = block_influence(student, [collate(eval_rows[i:i + 8], pad)[0] for i in range(0, min(len(eval_rows), 32), 8)])
                keep_t = torch.tensor(by_importance(scores, n_keep))
            keep = d.broadcast(keep_t, "the layer choice's broadcast").tolist()
        else:
            keep = evenly_kept(len(student.layers), n_keep)
        student = drop_layers(student, keep).requires_grad_(True)
        before = evaluate_loss(student, eval_rows, pad, d=d)["eval_ppl"]
        # FSDP2 shards the student in place (its hooks survive no deep copy, which the next stage's drop makes): a
        # plain copy receives the trained full weights after the stage
        plain = copy.deepcopy(student) if fsdp else None
        train_student = wrap(student, d, fsdp)  # DDP, or FSDP2 in place; world 1: the student
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps_per_stage, "cosine"))
        student.train()
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(args.steps_per_stage), disable=not (progress and d.main), desc=f"{n_keep} layers", file=sys.stderr)
        for step in bar:
            d.step = step
            with d.guard(f"a distillation step ({n_keep} layers: forward, backward, gradient all-reduce)"):
                x, y = next(batches)
                n = float(d.all_reduce(torch.tensor([float((y[:, 1:] != IGNORE).sum())]), "the token-count all-reduce"))
                with torch.no_grad():
                    t_logits = teacher(x)
                with autocast(False):
                    loss = distill_loss(train_student(x), t_logits, y, args.temperature, args.alpha, tokens=n)
                (loss * d.world).backward()  # DDP averages over the ranks: Σ_r loss_r, the global batch's loss
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                losses.append(float(d.all_reduce(loss.detach().double(), "the loss all-reduce")))
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if plain is not None:
            with d.guard(f"gathering the {n_keep}-layer student's weights"):
                student = copy_full_weights(student, plain)
        student.eval().requires_grad_(False)
        report["stages"].append({
            "layers": n_keep, "kept": keep, "params": param_count(student), "eval_ppl_after_drop": before,
            "eval_ppl": evaluate_loss(student, eval_rows, pad, d=d)["eval_ppl"], "train_seconds": round(time.perf_counter() - t0, 1),
            "decode_tok_s": decode_speed(student, prompt, args.speed_tokens) if d.main else None, "losses": losses})
        if d.main:
            print(json.dumps({k: v for k, v in report["stages"][-1].items() if k != "losses"}), file=sys.stderr)
    from .hf_export import save_hf_llama

    if d.main and hasattr(student.cfg, "rope_theta"):
        save_hf_llama(student, tok, out / "student")
        report["student_dir"] = str(out / "student")
    if d.main:
        (out / "distill_report.json").write_text(json.dumps(report, indent=2))
    d.barrier("the end of the run")
    report["student"] = student
    return report


__all__ = ["DistillArgs", "distill", "distill_loss"]
