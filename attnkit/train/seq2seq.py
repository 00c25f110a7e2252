"""Training an encoder–decoder on a generated task, the way the paper trains (§5).

Each step is ONE parallel pass: the encoder reads the whole source, and the decoder reads the
whole shifted target <bos> y₁…yₙ₋₁ under the causal mask and predicts y₁…yₙ <eos> at every
position at once (teacher forcing). Loss: cross-entropy with label smoothing ε_ls (§5.4);
optimiser: Adam(0.9, 0.98, 1e-9) with the warm-up schedule (eq. 3); gradient-norm clipping.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.json_config import JsonConfig
from ..data import Seq2SeqTask, Vocab, get_task, make_batch
from ..data.vocab import batches
from ..decoding import beam_search, greedy_decode
from .checkpoint import (
    build_model,
    load_checkpoint,
    load_optimizer_state,
    read_trainer_state,
    save_checkpoint,
)
from .schedule import noam_lr, noam_scheduler, paper_adam


@dataclass
class TrainArgs(JsonConfig):
    task: str = "reverse"
    model: str = "transformer"  # 'transformer' | 'lstm'
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    norm_first: bool = False
    steps: int = 3000
    batch_size: int = 64
    warmup: int = 400
    lr_factor: float = 0.5
    label_smoothing: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_examples: int = 1000
    save_every: int = 0  # steps between checkpoints; 0 = only at the end

    def __post_init__(self) -> None:
        get_task(self.task)  # clear error for an unknown task
        if self.model not in ("transformer", "lstm"):
            raise ValueError(f"model must be 'transformer' or 'lstm', got {self.model!r}")
        for name in ("d_model", "n_layers", "steps", "batch_size", "warmup"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


def new_model(args: TrainArgs, vocab: Vocab) -> nn.Module:
    V = len(vocab)
    if args.model == "transformer":
        config = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=args.d_model, n_heads=args.n_heads,
                      n_encoder_layers=args.n_layers, n_decoder_layers=args.n_layers, d_ff=args.d_ff,
                      dropout=args.dropout, norm_first=args.norm_first, final_norm=args.norm_first,
                      share_embeddings=True, tie_output=True, max_len=256)
        return build_model("seq2seq_transformer", config)
    config = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=args.d_model, n_layers=args.n_layers,
                  dropout=args.dropout)
    return build_model("lstm_seq2seq", config)


def decode_batch(model: nn.Module, src: torch.Tensor, max_len: int, beam: int = 1, alpha: float = 0.6) -> torch.Tensor:
    """Ids (B, ≤ max_len) from greedy (beam ≤ 1) or beam search."""
    model.eval()
    if beam > 1:
        if not hasattr(model, "init_cache"):
            raise ValueError(f"beam search needs a Transformer checkpoint; {type(model).__name__} decodes greedily only")
        return beam_search(model, src, beam_size=beam, max_len=max_len, alpha=alpha)[0]
    if hasattr(model, "greedy_decode"):  # models with their own step function (the LSTM baseline)
        return model.greedy_decode(src, max_len)
    return greedy_decode(model, src, max_len=max_len)


@torch.no_grad()
def evaluate(model: nn.Module, task: Seq2SeqTask, vocab: Vocab, n: int = 1000, seed: int = 0, beam: int = 1,
             batch_size: int = 250) -> dict:
    """Exact-match sequence accuracy and token accuracy on ``n`` held-out examples."""
    examples = task.take("test", n, seed)
    exact = tok_ok = tok_all = 0
    for i in range(0, n, batch_size):
        chunk = examples[i : i + batch_size]
        src, _, _ = make_batch(chunk, vocab)
        out = decode_batch(model, src, task.max_tgt_len + 2, beam=beam)
        for (_, tgt), ids in zip(chunk, out.tolist()):
            pred = vocab.decode(ids)
            exact += pred == tgt
            tok_ok += sum(a == b for a, b in zip(pred, tgt))
            tok_all += max(len(pred), len(tgt))
    return {"exact_match": exact / n, "token_accuracy": tok_ok / max(tok_all, 1), "n": n, "beam": beam}


def train(args: TrainArgs, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``args``; checkpoint into ``out_dir``; return the final evaluation as a dict."""
    out_dir = Path(out_dir)
    task = get_task(args.task)
    vocab = Vocab(task.symbols)
    torch.manual_seed(args.seed)
    start_step, elapsed = 0, 0.0
    if resume:  # the run's own recipe; only the schedule's length and the bookkeeping may change
        model, config = load_checkpoint(out_dir)
        args = replace(TrainArgs.from_dict(config["train_args"]), steps=args.steps, save_every=args.save_every,
                       eval_examples=args.eval_examples)
        task = get_task(args.task)
        vocab = Vocab.from_dict(config["vocab"])
        state = read_trainer_state(out_dir)
        start_step, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
    else:
        model = new_model(args, vocab)
    d_model = args.d_model
    optimizer = paper_adam(model.parameters())
    scheduler = noam_scheduler(optimizer, d_model, args.warmup, args.lr_factor)
    if resume:
        load_optimizer_state(out_dir, model, optimizer)
        scheduler.last_epoch = start_step
        for group in optimizer.param_groups:
            group["lr"] = noam_lr(start_step + 1, d_model, args.warmup, args.lr_factor)

    stream = task.examples("train", args.seed)
    for _ in range(start_step * args.batch_size):  # resume where the data stream stood
        next(stream)
    data = batches(stream, vocab, args.batch_size)
    meta = {"vocab": vocab.to_dict(), "task": args.task, "train_args": args.to_dict()}

    def checkpoint(step: int) -> None:
        save_checkpoint(out_dir, model, meta, optimizer, {"step": step, "elapsed_s": elapsed})

    model.train()
    bar = tqdm(total=args.steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    tokens, t_last = 0, time.perf_counter()
    loss_value = float("nan")
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        src, tgt_in, tgt_out = next(data)
        logits = model(src, tgt_in)  # (B, T, V): every target position in one pass
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                               ignore_index=vocab.pad_id, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        elapsed += time.perf_counter() - t0
        tokens += int((src != vocab.pad_id).sum() + (tgt_out != vocab.pad_id).sum())
        loss_value = loss.item()
        now = time.perf_counter()
        if now - t_last > 0.5 or step + 1 == args.steps:
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / (now - t_last):.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            tokens, t_last = 0, now
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0:
            checkpoint(step + 1)
    bar.close()
    checkpoint(args.steps)

    result = {"task": args.task, "model": args.model, "steps": args.steps, "train_seconds": round(elapsed, 1),
              "final_loss": loss_value, "parameters": sum(p.numel() for p in model.parameters()),
              "greedy": evaluate(model, task, vocab, args.eval_examples, args.seed)}
    if args.model == "transformer":
        result["beam4"] = evaluate(model, task, vocab, args.eval_examples, args.seed, beam=4)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result
