"""Fine-tuning a pretrained causal LM with a PEFT method (or all its weights) on JSONL data.

Each optimiser step averages the gradients of ``grad_accum`` micro-batches; the loss is the
next-token cross-entropy over the positions whose label is not −100 (the response tokens), computed
in float32 even under bf16 autocast. The learning rate warms up linearly for ``warmup`` steps, then
decays to zero along a cosine (Loshchilov & Hutter 2017) or a line. Every ``eval_every`` steps the
held-out loss and perplexity exp(loss) are measured (the eval split: ``eval_data``, else the last
``eval_fraction`` of the data); the progress bar shows the loss, tokens/s, the latest eval loss and the
ETA, loss_curve.png the curves. Checkpoints (adapter in HF PEFT's format, optimizer state in
safetensors, trainer state in JSON) are written atomically and resume exactly. ``packing`` puts whole
examples in a row, each attending only to itself (Krell et al. 2021); ``gradient_checkpointing``
recomputes each decoder block in the backward (Chen et al. 2016). Under ``torchrun`` the run is data parallel
(DDP, or FSDP2 with ``fsdp``; :mod:`attnkit.train.distributed`): the same global batch, the same losses, rank 0
writing everything, checkpoints that resume at any world size.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from ..kernels import native_bf16
from ..kernels.allocator import return_freed_memory
from ..models.json_config import JsonConfig
from ..nn.recompute import recompute_saved
from ..peft import METHODS, PeftConfig, PeftModel, get_peft_model
from ..quant.native import release_scratch
from .chunked_loss import chunked_lm_loss, head_is_frozen, hidden_head, release_buffers
from .checkpoint import CheckpointError, commit_dir, load_optimizer_state, read_trainer_state, recover_dir
from .distributed import (Dist, fsdp_units, full_weights, init_distributed, optimizer_tensors, shard_optimizer_state,
                          sync_gradients, trainable_tensors, unwrap, wrap)
from .sft_data import IGNORE, PACKING, Example, collate, load_examples, micro_batches, pack

SCHEDULES = ("cosine", "linear", "constant")
QLORA_BASES = ("gguf", "int4", "int8", "nf4")  # load_causal_lm's quantize values a frozen base can train through


@dataclass
class FinetuneArgs(JsonConfig):
    method: str = "lora"  # lora | adapter | prefix | prompt | ptuning | ia3 | full
    data: str = ""
    eval_data: str | None = None  # default: the last eval_fraction of data
    eval_fraction: float = 0.1
    model: str | None = None  # GGUF file or HF directory; None = the embedded default model
    quantize: str | None = None  # QLoRA: the base stays quantized — "gguf" (a GGUF's own blocks), "nf4", "int4", "int8"
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seq_len: int = 256
    packing: bool = False
    packing_strategy: str = "bfd"  # bfd: best-fit decreasing (fewer padded rows); order: the data's order
    bf16: bool | None = None  # bf16 autocast; None: where the CPU multiplies bf16 in hardware
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward: less memory, ~1/3 more time
    seed: int = 0
    eval_every: int = 50
    save_every: int = 0
    fsdp: bool = False  # under torchrun: FSDP2 (parameters, gradients and optimizer state sharded) instead of DDP
    dist_timeout: float = 300.0  # seconds any collective may wait for the other ranks before it is an error
    # method hyperparameters
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_dora: bool = False  # LoRA: DoRA's magnitude vector (Liu et al. 2024), as HF PEFT's use_dora
    target_modules: str | None = None  # comma-separated; default: the method's defaults
    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int = 128
    encoder_type: str = "MLP"
    prompt_init_text: str | None = None
    bottleneck_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "full"):
            raise ValueError(f"method must be one of {', '.join([*METHODS, 'full'])}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError("warmup must be ≥ 0 and lr > 0")
        if not self.data:
            raise ValueError("data: a JSONL file is required")
        if self.quantize is not None and self.quantize not in QLORA_BASES:
            raise ValueError(f"quantize must be one of {', '.join(QLORA_BASES)} or unset, got {self.quantize!r}")
        if self.packing_strategy not in PACKING:
            raise ValueError(f"packing_strategy must be one of {', '.join(PACKING)}, got {self.packing_strategy!r}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.fsdp and self.quantize is not None:
            raise ValueError(f"fsdp with quantize={self.quantize}: FSDP shards float parameters and a quantized base "
                             "is not one; train QLoRA data parallel with DDP (drop --fsdp)")
        if self.quantize is not None and self.method == "full":
            raise ValueError(f"quantize={self.quantize}: a quantized base is frozen; full fine-tuning needs it in float")


def peft_config(args: FinetuneArgs) -> PeftConfig | None:
    """The PEFT config the arguments describe (None for full fine-tuning)."""
    targets = None if args.target_modules is None else [t.strip() for t in args.target_modules.split(",") if t.strip()]
    tm = {} if targets is None else {"target_modules": targets}
    P = args.num_virtual_tokens
    return {
        "lora": lambda: METHODS["lora"](r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                         use_dora=args.use_dora, **tm),
        "ia3": lambda: METHODS["ia3"](**tm),
        "adapter": lambda: METHODS["adapter"](bottleneck_size=args.bottleneck_size, adapter_dropout=args.dropout, **tm),
        "prefix": lambda: METHODS["prefix"](num_virtual_tokens=P, prefix_projection=args.prefix_projection,
                                            encoder_hidden_size=args.encoder_hidden_size),
        "prompt": lambda: METHODS["prompt"](num_virtual_tokens=P, prompt_tuning_init="TEXT" if args.prompt_init_text else "RANDOM",
                                            prompt_tuning_init_text=args.prompt_init_text),
        "ptuning": lambda: METHODS["ptuning"](num_virtual_tokens=P, encoder_hidden_size=args.encoder_hidden_size,
                                              encoder_reparameterization_type=args.encoder_type),
        "full": lambda: None,
    }[args.method]()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine / linear decay to 0 at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of position t's logits (B, T, V) against label t+1 (B, T), ignoring −100."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", chunked: bool = True,
               **kw: Any) -> torch.Tensor:
    """:func:`lm_loss` of ``model(x, **kw)``, from its hidden states a chunk of rows at a time where the model can
    return them and ``chunked`` (:mod:`attnkit.train.chunked_loss`: the batch's logits never exist at once; not
    under FSDP, whose head runs only inside the forward)."""
    head = hidden_head(unwrap(model)) if chunked else None
    if head is None:
        return lm_loss(model(x, **kw), y, reduction)
    return chunked_lm_loss(*head, model(x, hidden_only=True, **kw), y, reduction, head_is_frozen(unwrap(model)))


@torch.no_grad()
def evaluate_loss(model: nn.Module, rows: list[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                  d: Dist | None = None, fsdp: bool = False) -> dict:
    """Token-weighted mean loss over ``rows`` and its perplexity. Data parallel (``d``): each rank takes every
    world-th batch and the sums are all-reduced; under ``fsdp`` every rank runs every batch (each forward is a
    collective)."""
    was = model.training
    model.eval()
    share = d is not None and d.on and not fsdp
    sums = torch.zeros(2, dtype=torch.float64)  # summed loss, labelled tokens
    for b, i in enumerate(range(0, len(rows), batch_size)):
        if share and b % d.world != d.rank:
            continue
        x, y = collate(rows[i:i + batch_size], pad_id)
        with autocast(bf16):
            sums[0] += float(model_loss(model, x, y, reduction="sum", chunked=not fsdp))
        sums[1] += int((y[:, 1:] != IGNORE).sum())
    model.train(was)
    if share:
        d.all_reduce(sums, "the evaluation's all-reduce")
    total, count = float(sums[0]), int(sums[1])
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


# -- checkpoints ------------------------------------------------------------------------------------
def save_state(out: Path, trainable: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], state: dict) -> None:
    """out/checkpoint/: the trainable tensors (:func:`~attnkit.train.distributed.trainable_tensors`), the optimizer
    state (:func:`~attnkit.train.distributed.optimizer_tensors`) and trainer_state.json — atomically
    (:func:`~attnkit.train.checkpoint.commit_dir`)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    try:
        # every trainable tensor (a prompt encoder's reparameterising network too): resume is exact
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(optim, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        commit_dir(tmp, out / "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the options that shape the trained tensors (or the model under them): a resumed run must keep them
FIXED_ON_RESUME = ("method", "model", "r", "target_modules", "num_virtual_tokens", "prefix_projection",
                   "encoder_hidden_size", "encoder_type", "prompt_init_text", "bottleneck_size", "use_dora", "quantize")


def resume_args(out: str | Path, overrides: dict[str, Any]) -> tuple[FinetuneArgs, dict[str, tuple[Any, Any]]]:
    """The arguments of the run in ``out`` (its finetune_args.json) with ``overrides`` — only the options
    the user named — applied. Returns them and {field: (the run's value, the new one)} of those changed;
    a change of a :data:`FIXED_ON_RESUME` field is a ValueError naming the option."""
    file = Path(out) / "finetune_args.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {out} holds no fine-tuning run to resume")
    try:
        raw = json.loads(file.read_text())
        raw.setdefault("packing_strategy", "order")  # runs from before best-fit packing: their rows came in order
        saved = FinetuneArgs.from_dict(raw).to_dict()
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None

    def same(k: str, a: Any, b: Any) -> bool:
        if k == "model" and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    changed = {k: (saved[k], v) for k, v in overrides.items() if k in saved and not same(k, saved[k], v)}
    for k, (was, now) in changed.items():
        if k in FIXED_ON_RESUME:
            raise ValueError(f"--{k.replace('_', '-')} {now}: the run in {out} was trained with {k}={was!r} "
                             "and its checkpoint only fits that; drop the option (or start a new run)")
    return FinetuneArgs.from_dict({**saved, **overrides}), changed


def _restore(ckpt: Path, model: nn.Module) -> None:
    """Load the trainable tensors of ``ckpt`` into ``model`` (built as for the original run)."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no checkpoint to resume")
    try:
        saved = load_file(str(ckpt / "trainable.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{ckpt / 'trainable.safetensors'}: cannot read ({e})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise CheckpointError(f"{ckpt}: trainable tensors differ from this run's "
                              f"(missing {sorted(set(params) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(params))[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


# -- the run --------------------------------------------------------------------------------------------
def split_rows(args: FinetuneArgs, tok: Any) -> tuple[list[Example], list[Example]]:
    train = load_examples(args.data, tok, args.seq_len)
    if args.eval_data:
        return train, load_examples(args.eval_data, tok, args.seq_len)
    n_eval = max(1, int(len(train) * args.eval_fraction)) if len(train) > 1 else 0
    return train[:len(train) - n_eval], train[len(train) - n_eval:]


def _resume_batch(args: FinetuneArgs, state: dict, world: int, named: bool) -> tuple[FinetuneArgs, str | None]:
    """On resume, keep the run's global micro-batch (``batch_size × world``) at this world size: the per-rank
    ``batch_size`` becomes global / world, so the data order and the losses continue as they would have.
    A ``batch_size`` the user named wins (the global batch then changes)."""
    size = int(state.get("global_batch", args.batch_size))
    if named or args.batch_size * world == size:
        return args, None
    if size % world:
        raise ValueError(f"the run's global micro-batch is {size} rows (batch_size × world size "
                         f"{state.get('world_size', 1)}); world size {world} does not divide it: resume at a world "
                         "size that does, or name --batch-size (the global batch then changes)")
    note = (f"resume: world size {state.get('world_size', 1)} → {world}: per-rank batch {args.batch_size} → "
            f"{size // world} (the run's global micro-batch of {size} rows kept)")
    return replace(args, batch_size=size // world), note


def finetune(args: FinetuneArgs, out_dir: str | Path, resume: bool = False, progress: bool = True,
             lm: Any = None, stop_after: int | None = None) -> dict:
    """Train per ``args`` into ``out_dir``; returns the metrics (also written to metrics.json).

    ``lm``: an already loaded :class:`~attnkit.loading.CausalLM` (else ``args.model`` is loaded).
    ``stop_after``: leave after this many steps with a checkpoint (``resume`` continues the run).
    Under torchrun (or in an initialised process group) every rank runs this; rank 0 alone writes.
    """
    from ..loading import load_causal_lm

    out = Path(out_dir)
    d = init_distributed(args.dist_timeout)
    fsdp = args.fsdp and d.on
    show = progress and d.main
    state: dict = {"step": 0, "micro_batches": 0, "samples": 0, "elapsed_s": 0.0, "history": [], "evals": []}
    if resume:  # the given arguments, checked against the run's (the CLI merges the named options first)
        if d.main:
            recover_dir(out / "checkpoint")
        d.barrier("resume (rank 0 recovering the checkpoint)")
        args, changed = resume_args(out, args.to_dict())
        state = read_trainer_state(out / "checkpoint")
        args, note = _resume_batch(args, state, d.world, "batch_size" in changed)
        if note and show:
            print(note, file=sys.stderr)
    if args.bf16 is None:  # bf16 hardware: 2–3× float32's products, the same eval loss (docs/finetune.md, session 21);
        args = replace(args, bf16=native_bf16())  # a quantized base's tiles too (bf16 tiles: 2.7× at 1B, session 27)
    torch.manual_seed(args.seed)
    if args.quantize is not None:  # QLoRA runs under a memory budget: freed temporaries go back, not kept in the heap
        return_freed_memory()
    lm = load_causal_lm(args.model, quantize=args.quantize) if lm is None else lm
    if args.gradient_checkpointing and not hasattr(lm.model, "gradient_checkpointing"):
        raise ValueError(f"gradient_checkpointing: {type(lm.model).__name__} has no checkpointed block stack")
    if hasattr(lm.model, "gradient_checkpointing"):
        lm.model.gradient_checkpointing = args.gradient_checkpointing
    tok = lm.tokenizer
    pad_id = tok.pad_id if tok.pad_id is not None else min(tok.eos_ids or {0})
    train_rows, eval_rows = split_rows(args, tok)
    if args.packing:
        if args.method in ("prompt", "ptuning") or "doc_ids" not in inspect.signature(lm.model.forward).parameters:
            raise ValueError(f"packing keeps each example to itself with per-token document ids, which "
                             f"{args.method if args.method in ('prompt', 'ptuning') else type(lm.model).__name__} "
                             "does not take; drop --packing")
        train_rows = pack(train_rows, args.seq_len, boundaries=True, strategy=args.packing_strategy)
    cfg = peft_config(args)
    if cfg is None:
        model: nn.Module = lm.model.requires_grad_(True)
    else:
        model = get_peft_model(lm.model, cfg, tokenizer=tok)
    if resume:
        _restore(out / "checkpoint", model)  # full tensors, before DDP / FSDP takes the model
        if show:
            print(f"resuming {out} at step {state['step']} of {args.steps}", file=sys.stderr)
        d.barrier("resume (every rank reading the checkpoint)")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_args.json").write_text(json.dumps(args.to_dict(), indent=2))
    trainable, total = (model.trainable_parameters() if isinstance(model, PeftModel)
                        else (sum(p.numel() for p in model.parameters()),) * 2)
    train_model = wrap(model, d, fsdp)  # DDP, or FSDP2 in place; world 1: the model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if resume:
        load_optimizer_state(out / "checkpoint", model, optimizer)
        if fsdp:
            shard_optimizer_state(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.schedule))
    scheduler.last_epoch = state["step"]  # resume: the learning rate of the step about to run
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(state["step"], args.warmup, args.steps, args.schedule)
    if show:
        print(f"{args.method}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%); "
              f"{len(train_rows)} training rows, {len(eval_rows)} eval rows"
              + (f"; {'FSDP' if fsdp else 'DDP'} over {d.world} ranks" if d.on else ""), file=sys.stderr)
    size = args.batch_size * d.world  # the global micro-batch; the data position is kept in global rows
    was = int(state.get("global_batch", size))
    state.setdefault("samples", state["micro_batches"] * was)
    state["micro_batches"] = state["micro_batches"] if was == size else state["samples"] // size
    state["world_size"], state["global_batch"] = d.world, size
    data = micro_batches(train_rows, args.batch_size, pad_id, args.seed, start=state["micro_batches"],
                         rank=d.rank, world=d.world)

    def evaluate() -> dict:
        result = {"step": state["step"], **evaluate_loss(model, eval_rows, pad_id, batch_size=min(8, args.batch_size),
                                                         bf16=args.bf16, d=d, fsdp=fsdp)}
        if args.quantize is not None:  # a bf16 evaluation's decoded-weight buffer: not kept through the steps
            release_scratch()
        return result

    if state["step"] == 0 and not state["evals"]:
        state["evals"].append(evaluate())

    def checkpoint() -> None:
        if d.main or fsdp:  # FSDP: gathering the full tensors is a collective
            with d.guard("gathering the checkpoint's tensors"):
                tensors, optim = trainable_tensors(model), optimizer_tensors(model, optimizer)
            if d.main:
                save_state(out, tensors, optim, state)

    train_model.train()
    bar = tqdm(total=args.steps, initial=state["step"], disable=not show, unit="step", dynamic_ncols=True)
    postfix = dict.fromkeys(("loss", "tok/s", "lr"), "-")  # tokens/s without the padding; then the latest eval loss
    if state["evals"]:
        postfix["eval"] = f"{state['evals'][-1]['eval_loss']:.3f}"
    end = args.steps if stop_after is None else min(args.steps, stop_after)
    g = args.grad_accum
    while state["step"] < end:
        d.step = state["step"]
        t0 = time.perf_counter()
        with d.guard("a training step (forward, backward, gradient all-reduce)"):
            batches = [next(data) for _ in range(g)]  # packed rows: (x, y, document ids)
            counts = torch.tensor([[int((b[1][:, 1:] != IGNORE).sum()),  # labelled tokens, and tokens not padding
                                    int((b[2] >= 0).sum()) if len(b) > 2 else int((b[0] != pad_id).sum())]
                                   for b in batches], dtype=torch.float64)
            counts = d.all_reduce(counts, "the token-count all-reduce")  # N_k of the global micro-batches
            sums = torch.zeros(g, dtype=torch.float64)
            for k, (x, y, *docs) in enumerate(batches):
                with sync_gradients(train_model, k == g - 1):
                    with autocast(args.bf16), recompute_saved():
                        s = model_loss(train_model, x, y, "sum", chunked=not fsdp, **({"doc_ids": docs[0]} if docs else {}))
                    (s / max(float(counts[k, 0]), 1.0) * (d.world / g)).backward()  # ranks average: Σ_r S_r / N_k / g
                sums[k] = float(s.detach())
                state["micro_batches"] += 1
                state["samples"] += size
            d.all_reduce(sums, "the loss all-reduce")
            step_loss = float((sums / counts[:, 0].clamp(min=1)).sum()) / g
            tokens = int(counts[:, 1].sum())
            if args.clip > 0:
                nn.utils.clip_grad_norm_(params, args.clip)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        dt = time.perf_counter() - t0
        state["elapsed_s"] += dt
        state["history"].append({"step": state["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                 "tokens": tokens, "tokens_per_s": tokens / dt})
        postfix["loss"], postfix["tok/s"] = f"{step_loss:.3f}", f"{tokens / dt:,.0f}"
        postfix["lr"] = f"{scheduler.get_last_lr()[0]:.1e}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)  # the bar's own ETA: the remaining steps at the measured rate
        s = state["step"]
        if (args.eval_every and s % args.eval_every == 0) or s == args.steps:
            state["evals"].append(evaluate())
            postfix["eval"] = f"{state['evals'][-1]['eval_loss']:.3f}"
            bar.set_postfix(postfix)
            if show:
                bar.write(f"step {s}: eval loss {state['evals'][-1]['eval_loss']:.4f} "
                          f"ppl {state['evals'][-1]['eval_ppl']:.2f}", file=sys.stderr)
        if args.save_every and s % args.save_every == 0 and s < args.steps:
            checkpoint()
    bar.close()
    release_buffers()  # the loss's reused buffers and cast head: the run is over
    checkpoint()
    model.eval()
    if state["step"] < args.steps:  # interrupted on purpose: the checkpoint is the result
        d.barrier("the end of the run")
        return {"method": args.method, "steps": state["step"], "stopped": True, "model": model}
    weights = None
    if fsdp:  # the full weights back in every rank's model, to save and to return
        with d.guard("gathering the final weights"):
            weights = None if isinstance(model, PeftModel) else full_weights(model)
            for m in fsdp_units(model):
                m.unshard()
    if d.main:
        if isinstance(model, PeftModel):
            model.save_pretrained(out / "adapter")
        elif weights is not None:
            save_file(weights, str(out / "model.safetensors"))
        else:
            save_model(model, str(out / "model.safetensors"))
        plot_losses(state, out / "loss_curve.png", f"{args.method} fine-tuning")
    result = {"method": args.method, "steps": state["step"], "train_seconds": round(state["elapsed_s"], 1),
              "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
              "train_examples": len(train_rows), "eval_examples": len(eval_rows), "world_size": d.world,
              "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
              "eval_before": state["evals"][0], "eval_after": state["evals"][-1]}
    if d.main:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    d.barrier("the end of the run")
    result["model"] = model
    return result


def plot_losses(state: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    h = state["history"]
    if h:
        ax.plot([r["step"] for r in h], [r["loss"] for r in h], lw=0.8, alpha=0.6, label="train loss")
    ev = state["evals"]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
