"""``attnkit serve``: the OpenAI-compatible server on uvicorn.

Binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM (or Ctrl-C) stops accepting connections,
answers requests that still arrive on open connections with 503, lets the in-flight ones finish
(at most ``--drain-timeout`` seconds), then exits with status 0.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import signal
import sys

from ..engine.cli import add_speculative_flags, speculative_config, speculative_draft
from ..engine.options import InferenceOptions


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, embeddings, metrics)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ATTNKIT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $ATTNKIT_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched per engine step")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="queued sequences beyond which requests get 503 (retry later)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV-cache pool size in MiB")
    p.add_argument("--embedding-model", default=None, help="HF directory of a BERT-family model "
                   "(default: all-MiniLM-L6-v2)")
    p.add_argument("--no-embeddings", action="store_true", help="serve no /v1/embeddings model")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds in-flight requests get at shutdown")
    InferenceOptions.add_flags(p)  # --dtype, --quantize, --threads, --compile, --kv-cache-dtype
    add_speculative_flags(p)
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR (HF PEFT format) as model `<model>:NAME`; repeatable")
    p.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="engine replicas, each in its own process with cores/N torch threads, behind this one server "
                        "(routed by prefix-cache affinity, then load; default 1: one engine in this process)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split every layer over N ranks (Megatron-LM; gloo on the CPU): spawned on this machine, or "
                        "started by torchrun (`torchrun --nproc_per_node N [--nnodes M --node-rank R --master-addr "
                        "HOST] -m attnkit serve ...`: the world size is torchrun's); each rank loads only its slice")
    p.add_argument("--dist-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a rank waits on the others before it reports them stopped (default 120)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def build_engine(args: argparse.Namespace, tp=None):
    """Load the model and start one engine with its LoRA adapters: (engine, CausalLM). Each data-parallel
    replica runs this in its own process; ``tp``: rank 0 of a tensor-parallel group (its slice, driving the
    others: :func:`attnkit.parallel.engine.attach`)."""
    from ..engine import EngineConfig, LLMEngine
    from ..models.gpt2 import GPT2
    from ..models.llama import Llama

    opts = InferenceOptions.from_args(args)
    spec = speculative_config(args)
    lm = opts.load(args.model, tp)
    if not isinstance(lm.model, (Llama, GPT2)):
        raise ValueError(f"{lm.path}: the engine runs decoder-only models (Llama family, GPT-2); "
                         f"{type(lm.model).__name__} is not one")
    draft = speculative_draft(spec, opts, lm.model)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
                       kv_cache_bytes=args.kv_cache_mb << 20, compile=opts.compile,
                       kv_cache_dtype=opts.engine_kv_cache_dtype(), speculative=spec,
                       kv_exact_blocks=opts.engine_kv_exact_blocks())
    engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.stop_ids, draft)
    if tp is not None:
        from ..parallel.engine import attach

        attach(engine, tp, heartbeat_s=args.dist_timeout / 4)
    for name, directory in _loras(args):
        engine.add_lora(name, directory)
    return engine, lm


def rank_model(args: argparse.Namespace, tp):
    """A tensor-parallel worker's slice of the model, prepared as rank 0's (a picklable factory:
    ``functools.partial(rank_model, args)``)."""
    return InferenceOptions.from_args(args).load(args.model, tp).model


def start_tensor_parallel(args: argparse.Namespace, threads: int | None = None):
    """Rank 0's TensorParallel of ``--tensor-parallel-size`` (workers spawned here, each rank on ``threads`` torch
    threads) or of torchrun (None: one process). A torchrun rank other than 0 serves rank 0's steps here and exits."""
    from ..parallel import launch

    size = getattr(args, "tensor_parallel_size", 1)  # checked by build_from_args
    if launch.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        if size not in (1, int(os.environ["WORLD_SIZE"])):
            raise ValueError(f"--tensor-parallel-size {size} differs from torchrun's world size {os.environ['WORLD_SIZE']}")
        tp = launch.join_from_env(timeout_s=args.dist_timeout)
        if tp.rank != 0:
            from ..parallel.engine import serve_worker

            serve_worker(rank_model(args, tp), tp)
            raise SystemExit(0)
        return tp
    if size == 1:
        return None
    tp, workers = launch.spawn_workers(size, functools.partial(rank_model, args), timeout_s=args.dist_timeout,
                                       threads=threads)
    tp.workers = workers
    return tp


def replica_engine(args: argparse.Namespace):
    """The engine of one data-parallel replica (a picklable factory: ``functools.partial(replica_engine, args)``).
    With ``--tensor-parallel-size N`` the replica is rank 0 of its own group of N ranks, spawned here, which
    share the replica's threads (:func:`close_replica_engine` stops them)."""
    import torch

    size = getattr(args, "tensor_parallel_size", 1)
    tp = start_tensor_parallel(args, threads=max(1, torch.get_num_threads() // size)) if size > 1 else None
    return build_engine(args, tp)[0]


def close_replica_engine(engine) -> None:
    """Stop what a replica's engine started: its tensor-parallel workers (waited for), if any."""
    close = getattr(engine.runner, "close", None)
    if close is not None:
        close()
        workers = getattr(engine.runner.tp, "workers", None)
        if workers is not None:
            workers.join(30)


def _loras(args: argparse.Namespace) -> list[tuple[str, str]]:
    loras = []
    for spec in args.lora:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora {spec!r}: expected NAME=DIR")
        loras.append((name, directory))
    return loras


def build_from_args(args: argparse.Namespace):
    """Load the models and build the app (separate from serving, for tests and embedding)."""
    from ..loading import load_sentence_encoder
    from .app import build_app

    InferenceOptions.from_args(args)  # bad options fail here, before any model loads
    for name in ("port", "max_num_seqs", "max_waiting", "kv_cache_mb"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    _loras(args)
    speculative_config(args)
    dp, tp_size = getattr(args, "data_parallel_size", 1), getattr(args, "tensor_parallel_size", 1)
    for flag, n in (("--data-parallel-size", dp), ("--tensor-parallel-size", tp_size)):
        if n < 1:
            raise ValueError(f"{flag} must be at least 1, got {n}")
    if dp > 1:
        from ..engine.data_parallel import DataParallelEngine, load_tokenizer
        from ..parallel import launch

        if launch.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError("--data-parallel-size under torchrun is not supported: torchrun's ranks form one "
                             "tensor-parallel group; run --data-parallel-size N --tensor-parallel-size M on each machine")
        tokenizer, path = load_tokenizer(args.model)
        engine = DataParallelEngine(functools.partial(replica_engine, args), dp, tokenizer, threads=args.threads,
                                    close=close_replica_engine if tp_size > 1 else None)
    else:
        tp = start_tensor_parallel(args)
        engine, lm = build_engine(args, tp)
        path = lm.path
        if tp is not None:  # the workers stop with this process
            atexit.register(engine.runner.close)
    embedder, embedding_name = None, None
    if not args.no_embeddings:
        embedder = load_sentence_encoder(args.embedding_model)
        embedding_name = (os.path.basename(os.path.normpath(args.embedding_model)) if args.embedding_model
                          else "all-MiniLM-L6-v2")
    name = args.served_model_name or (path.stem if path.is_file() else path.name)
    return build_app(engine, name, embedder=embedder, embedding_name=embedding_name, api_key=args.api_key,
                     drain_timeout=args.drain_timeout), engine


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app, _ = build_from_args(args)
    engine = app.state.serve.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            engine.draining = True  # requests still arriving on open connections get 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; after a clean drain that is not a failure
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"attnkit serve: {app.state.serve.model_name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    server.run()
    return 0
