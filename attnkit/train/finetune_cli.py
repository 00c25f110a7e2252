"""``attnkit finetune`` (PEFT or full fine-tuning of a causal LM on JSONL) and ``attnkit distill``; both run data
parallel under ``torchrun --nproc_per_node N`` (:mod:`attnkit.train.distributed`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int}


def _add_fields(p: argparse.ArgumentParser, cls: Any, skip: tuple[str, ...] = (), help: dict[str, str] | None = None,
                named_only: bool = False) -> None:
    """One --option per dataclass field (booleans as --x/--no-x). ``named_only``: an option the user did not
    name leaves no attribute (``argparse.SUPPRESS``), so the dataclass (or a resumed run) fills it."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = None if f.default is MISSING else f.default
        kw: dict = {"default": argparse.SUPPRESS if named_only else default,
                    "help": (help or {}).get(f.name, "") + f" (default: {default})"}
        if str(f.type) in ("bool", "<class 'bool'>", "bool | None"):  # None: the default's own choice (auto)
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _TYPES[str(f.type)]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .finetune import FinetuneArgs

    p = sub.add_parser("finetune", help="fine-tune a causal LM on JSONL (LoRA, adapters, prefix/prompt/P-tuning, IA3, full)",
                       description="JSONL rows: {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} (chat template; "
                                   "loss on the assistant turns). Writes OUT/adapter (HF PEFT format), OUT/checkpoint, "
                                   "OUT/metrics.json and OUT/loss_curve.png.")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its data, steps and recipe; options "
                        "named with --resume override the run's (not those that shape the checkpoint's tensors)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_fields(p, FinetuneArgs, help={
        "fsdp": "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP",
        "dist_timeout": "under torchrun: seconds a collective waits for the other ranks before failing",
        "method": "lora | adapter | prefix | prompt | ptuning | ia3 | full", "data": "training JSONL (required)",
        "model": "GGUF file or HF directory; default: the embedded SmolLM2", "schedule": "cosine | linear | constant",
        "target_modules": "comma-separated module names",
        "packing_strategy": "with --packing: bfd (best-fit decreasing: fewest padded rows) | order (the data's order)",
        "encoder_type": "P-tuning encoder: MLP | LSTM",
        "bf16": "bf16 autocast (--no-bf16: float32); default: on where the CPU multiplies bf16 in hardware "
                "(AVX512-BF16, AMX); a quantized base's products then run on bf16 tiles"},
        named_only=True)
    p.set_defaults(func=_finetune)

    from .distill import DistillArgs

    d = sub.add_parser("distill", help="shrink a causal LM by dropping layers, distilling from the original at each stage",
                       description="Progressive shrinking with knowledge distillation (Hinton et al. 2015). Reports teacher "
                                   "vs student perplexity, parameters and decode speed; writes OUT/distill_report.json "
                                   "and the student as an HF directory OUT/student.")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--quiet", action="store_true")
    _add_fields(d, DistillArgs, help={
        "data": "training JSONL (required)", "model": "the teacher (GGUF or HF dir); default: the embedded SmolLM2",
        "stages": "layer counts per stage, e.g. 24,18 ('half': one stage to half the layers)",
        "selection": "importance (Block Influence) | every-other",
        "fsdp": "under torchrun: shard the student's parameters, gradients and optimizer state (FSDP2) instead of DDP",
        "dist_timeout": "under torchrun: seconds a collective waits for the other ranks before failing"})
    d.set_defaults(func=_distill)


def _finetune(args: argparse.Namespace) -> int:
    import torch

    from .finetune import FinetuneArgs, finetune, resume_args

    if args.threads:
        torch.set_num_threads(args.threads)
    named = {f.name: getattr(args, f.name) for f in fields(FinetuneArgs) if hasattr(args, f.name)}
    if args.resume:
        fa, changed = resume_args(args.out, named)
        for k, (was, now) in changed.items() if os.environ.get("RANK", "0") == "0" else ():  # torchrun: rank 0 says it
            print(f"resume: --{k.replace('_', '-')} {now} overrides the run's {was}", file=sys.stderr)
    else:
        fa = FinetuneArgs(**named)
    return _ranked("finetune", lambda: finetune(fa, args.out, resume=args.resume, progress=not args.quiet), "model")


def _ranked(command: str, run: Any, drop: str) -> int:
    """Run a (possibly data-parallel) command: rank 0 prints its result; a rank that lost another ends with the
    error naming it (exit status 1) instead of a traceback; the process group is torn down either way."""
    import torch.distributed as dist

    from .distributed import RankFailure

    try:
        result = run()
        result.pop(drop)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(result, indent=2))
        return 0
    except RankFailure as e:
        print(f"attnkit {command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _distill(args: argparse.Namespace) -> int:
    import torch

    from .distill import DistillArgs, distill

    if args.threads:
        torch.set_num_threads(args.threads)
    da = DistillArgs(**{f.name: getattr(args, f.name) for f in fields(DistillArgs)})
    return _ranked("distill", lambda: distill(da, args.out, progress=not args.quiet), "student")
