"""The ``attnkit`` command line. Each subcommand imports its machinery lazily, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import os
import sys

# Before torch is imported: OpenMP threads spin 10,000 rounds (well under a millisecond) at the end of a parallel
# region, then sleep. A decode step's many regions then follow each other without a futex wake-up each
# (OMP_WAIT_POLICY=PASSIVE, set here before, cost decode ~20%: docs/performance.md, session 15), and idle threads
# still do not spin for milliseconds beside other work on a 2-core machine (libgomp's default: 300,000 rounds).
# The user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"


# Each module here has ``add_commands(subparsers)``; imported when the parser is built.
_COMMAND_MODULES = (
    "attnkit.train.seq2seq_cli",  # seq2seq train|eval|translate|...
    "attnkit.engine.cli",  # generate, chat, embed
    "attnkit.train.finetune_cli",
    "attnkit.serve.cli",  # serve
    "attnkit.quant.cli",  # quantize
    "attnkit.quant.export_cli",  # export (merged GGUF, llama.cpp LoRA GGUF)
    "attnkit.eval.cli",  # perplexity
)


def _add_modules(sub: argparse._SubParsersAction) -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print a table and JSON (see benchmarks/)")
    from pathlib import Path

    names = sorted(f.stem for f in (Path(__file__).resolve().parent.parent / "benchmarks").glob("[a-z]*.py"))
    p.add_argument("name", choices=names, help="which benchmark (a script in benchmarks/)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.exists():
        print(f"attnkit bench: {script} not found (benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="The Transformer from first principles.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_modules(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    from .loading.errors import ModelLoadError
    from .train.checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ModelLoadError, ValueError) as e:  # bad input: a message, not a traceback
        print(f"attnkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
