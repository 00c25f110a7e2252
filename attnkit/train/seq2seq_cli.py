"""``attnkit seq2seq ...``: train, evaluate and run the encoder–decoder on the generated tasks."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from ..data import TASKS, Vocab, get_task, make_batch


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seq2seq", help="the original encoder-decoder on generated tasks (train/eval/translate)")
    s = p.add_subparsers(dest="seq2seq_command", metavar="ACTION", required=True)

    from .seq2seq import TrainArgs

    t = s.add_parser("train", help="train on a generated task; checkpoints as safetensors + JSON")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in fields(TrainArgs):
        kw: dict = {"default": f.default, "help": f"(default: {f.default})"}
        if f.name == "task":
            kw["choices"] = sorted(TASKS)
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
        t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    t.set_defaults(func=_train)

    e = s.add_parser("eval", help="exact-match accuracy on held-out examples")
    e.add_argument("checkpoint")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    e.set_defaults(func=_eval)

    r = s.add_parser("translate", help="decode one source string")
    r.add_argument("checkpoint")
    r.add_argument("source", nargs="+", help="source strings, e.g. 1987-03-14")
    r.add_argument("--beam", type=int, default=1)
    r.set_defaults(func=_translate)

    a = s.add_parser("attention", help="save the encoder-decoder attention of one example as a heat-map PNG")
    a.add_argument("checkpoint")
    a.add_argument("source")
    a.add_argument("--out", required=True, help="PNG path")
    a.set_defaults(func=_attention)

    d = s.add_parser("demo", help="train a small model on a task for a minute, then translate examples")
    d.add_argument("--task", default="dates", choices=sorted(TASKS))
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=_demo)
    tl = s.add_parser("tasks", help="list the generated tasks with an example each")
    tl.set_defaults(func=_tasks)


def _load(path: str):
    from ..train.checkpoint import load_checkpoint

    model, config = load_checkpoint(path)
    vocab = Vocab.from_dict(config["vocab"])
    return model.eval(), vocab, get_task(config["task"])


def _train(args: argparse.Namespace) -> int:
    from .seq2seq import TrainArgs, train

    if args.threads:
        torch.set_num_threads(args.threads)
    train_args = TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs)})
    result = train(train_args, args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .seq2seq import evaluate

    model, vocab, task = _load(args.checkpoint)
    print(json.dumps(evaluate(model, task, vocab, args.n, beam=args.beam), indent=2))
    return 0


def _decode(model, vocab, task, sources: list[str], beam: int) -> list[list[str]]:
    from .seq2seq import decode_batch

    src, _, _ = make_batch([(list(s), []) for s in sources], vocab)
    out = decode_batch(model, src, task.max_tgt_len + 2, beam=beam)
    return [vocab.decode(ids) for ids in out.tolist()]


def _translate(args: argparse.Namespace) -> int:
    model, vocab, task = _load(args.checkpoint)
    for s, pred in zip(args.source, _decode(model, vocab, task, args.source, args.beam)):
        print(f"{s}\t→\t{' '.join(pred)}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    from ..analysis.attention_plots import plot_attention

    model, vocab, task = _load(args.checkpoint)
    if not hasattr(model, "cross_attention_weights"):
        print("attention maps need a Transformer checkpoint", file=sys.stderr)
        return 2
    pred = _decode(model, vocab, task, [args.source], beam=1)[0]
    src, tgt_in, _ = make_batch([(list(args.source), pred)], vocab)
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        model.decode(tgt_in, memory, src_mask, need_weights=True)
    weights = [w[0].mean(0)[:, :] for w in model.cross_attention_weights()]  # head-averaged (T_tgt+1, T_src)
    # row i is the query that *predicts* target token i (its input is token i-1, or <bos>)
    out = plot_attention([w[: len(pred)] for w in weights], list(args.source) + ["<eos>"], pred, args.out,
                         title=f"encoder-decoder attention: {args.source} → {' '.join(pred)}")
    print(out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .seq2seq import TrainArgs, train

    task = get_task(args.task)
    print(f"training a small Transformer on '{task.name}' ({task.description}) for {args.steps} steps...")
    result = train(TrainArgs(task=args.task, steps=args.steps, d_model=128, n_heads=4, n_layers=2, d_ff=256,
                             warmup=200, eval_examples=300), args.out)
    print(f"held-out exact match: greedy {result['greedy']['exact_match']:.1%}, beam-4 "
          f"{result['beam4']['exact_match']:.1%} ({result['train_seconds']} s of training)")
    model, vocab, _ = _load(args.out)
    examples = task.take("test", 5, seed=123)
    preds = _decode(model, vocab, task, ["".join(s) for s, _ in examples], beam=4)
    for (s, t), p in zip(examples, preds):
        print(f"{''.join(s):>12}  →  {' '.join(p):<32} {'ok' if p == t else 'expected ' + ' '.join(t)}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    for name, task in sorted(TASKS.items()):
        src, tgt = task.take("train", 1, seed=0)[0]
        print(f"{name:8} {task.description:44} e.g. {''.join(src)} → {' '.join(tgt)}")
    return 0
