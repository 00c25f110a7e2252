"""Data-parallel training step at 2 ranks (gloo): its time split into compute and communication, and the bytes
all-reduced per step.

DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", §3.2) all-reduces
every trainable parameter's gradient once per optimiser step, in buckets overlapped with the backward; so per step
each rank contributes Σ_trainable numel · bytes — all the weights for full fine-tuning, only the adapter for LoRA
(a frozen base is never reduced). Measured on random Llama models (attnkit's own, attnkit.train.distributed's DDP
and loss), ``--threads`` per rank, synthetic token batches:

- bytes: counted by a DDP communication hook on every bucket it all-reduces (and Σ trainable gradient bytes);
- step time: a synced step (forward, backward with the bucketed all-reduce, AdamW) and a no-sync step (the same
  without the all-reduce, DDP's ``no_sync``), medians over ``--steps`` of each, interleaved, ranks aligned by a
  barrier before each. compute = the no-sync step; communication = the same hook's time from launching each
  bucket's all-reduce to its completion, summed over the step's buckets (it runs in gloo's thread, overlapped
  with the rest of the backward); exposed = synced − no-sync (what the step lost to it; within noise of 0 when
  the overlap hides it); and the all-reduce of one buffer of the step's gradient bytes timed alone.

    python benchmarks/distributed_train.py [--model small] [--methods full,lora] [--json docs/results/distributed_train.json]

``measure_ddp(...)`` returns the report (benchmarks/distributed.py includes it in its own).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from _report import cpu_model, write_report  # noqa: E402

MODELS = {  # LlamaConfig fields; "small": ~5 M parameters, "tiny": a few thousand
    "tiny": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "small": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688),
    "medium": dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1376),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, spec: dict, q) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec["world"]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(spec["threads"])
    try:
        q.put((rank, _measure_rank(spec)))
    except BaseException as e:  # noqa: BLE001 — reported by the parent
        q.put((rank, f"{type(e).__name__}: {e}"))


def _measure_rank(spec: dict) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from attnkit.models.llama import Llama, LlamaConfig
    from attnkit.peft import LoraConfig, get_peft_model
    from attnkit.train.distributed import init_distributed, sync_gradients, wrap
    from attnkit.train.finetune import model_loss

    d = init_distributed(120.0)
    cfg = LlamaConfig(**MODELS[spec["model"]], max_seq_len=spec["seq"], tie_embeddings=True)
    g = torch.Generator().manual_seed(d.rank)
    x = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), generator=g)
    out = []
    for method in spec["methods"]:
        torch.manual_seed(0)
        model = Llama(cfg)
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16))
        else:
            model.requires_grad_(True)
        fsdp = method == "fsdp"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        ddp = wrap(model, d, fsdp=fsdp)
        params = [p for p in model.parameters() if p.requires_grad]
        seen = {"bytes": 0, "buckets": 0, "comm_s": 0.0}

        def counting_hook(state, bucket):
            seen["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            seen["buckets"] += 1
            t0 = time.perf_counter()

            def done(fut):
                seen["comm_s"] += time.perf_counter() - t0
                return fut.value()
            return default_hooks.allreduce_hook(state, bucket).then(done)

        if not fsdp:
            ddp.register_comm_hook(None, counting_hook)
        opt = torch.optim.AdamW(params, lr=1e-4)
        n = float(x.numel() - x.shape[0]) * d.world  # every position but the last is labelled, on every rank

        def step(sync: bool) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            with sync_gradients(ddp, sync):
                (model_loss(ddp, x, x, "sum", chunked=not fsdp) / n * d.world).backward()
            opt.step()
            if sync:  # this rank's parameters, gradients and AdamW moments (shards under FSDP)
                state["bytes"] = sum(_local_bytes(t) for p in model.parameters() for t in (p, p.grad) if t is not None)
                state["bytes"] += sum(_local_bytes(v) for st in opt.state.values() for v in st.values())
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        state = {"bytes": 0}
        for _ in range(2):  # warm-up (and DDP's bucket rebuild after the first step)
            step(True), step(False)
        seen.update(bytes=0, buckets=0, comm_s=0.0)
        synced, local = [], []
        for _ in range(spec["steps"]):
            synced.append(step(True))
            local.append(step(False))
        # FSDP: no all-reduce; each step all-gathers the parameters twice (forward, backward) and reduce-scatters
        # the gradients, each moving (N−1)/N of the full size per rank on a ring (an estimate, not counted)
        per_step = 3 * trainable * 4 if fsdp else seen["bytes"] // spec["steps"]
        flat = torch.zeros(max(1, per_step // 4), dtype=torch.float32)
        alone = []
        for _ in range(spec["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            alone.append(time.perf_counter() - t0)
        s, c = statistics.median(synced), statistics.median(local)
        out.append({"method": method, "trainable_params": trainable, "total_params": total,
                    "grad_bytes_per_step": trainable * 4, "allreduced_bytes_per_step": per_step,
                    "bytes_counted": not fsdp, "buckets_per_step": seen["buckets"] // spec["steps"],
                    "state_bytes_per_rank": state["bytes"], "step_s": s, "compute_s": c,
                    "comm_s": None if fsdp else seen["comm_s"] / spec["steps"],
                    "comm_share": None if fsdp else seen["comm_s"] / spec["steps"] / s, "exposed_comm_s": s - c,
                    "allreduce_alone_s": statistics.median(alone),
                    "tokens_per_s": x.numel() * d.world / s})
    dist.destroy_process_group()
    return out


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure_ddp(model: str = "small", methods: tuple[str, ...] = ("full", "lora"), steps: int = 6, batch: int = 4,
                seq: int = 128, threads: int = 1, world: int = 2) -> dict:
    """Spawn ``world`` gloo ranks on this machine and measure a DDP training step of the random Llama ``model``
    (:data:`MODELS`) per method; returns the report (rank 0's timings; bytes are each rank's)."""
    import torch.multiprocessing as mp

    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if bad := [m for m in methods if m not in ("full", "lora", "fsdp")]:
        raise ValueError(f"methods must be among full, lora and fsdp (full fine-tuning under FSDP2), got {bad}")
    if min(steps, batch, seq, threads) < 1 or world < 2:
        raise ValueError("steps, batch, seq and threads must be ≥ 1 and world ≥ 2")
    spec = dict(model=model, methods=list(methods), steps=steps, batch=batch, seq=seq, threads=threads, world=world)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, spec, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if errors := {r: v for r, v in got.items() if isinstance(v, str)}:
        raise RuntimeError(f"distributed_train: ranks failed: {errors}")
    return {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads_per_rank": threads},
            "backend": "gloo", "world": world, "model": {"name": model, **MODELS[model]},
            "tokens_per_rank_step": batch * seq, "steps_timed": steps, "results": got[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=sorted(MODELS))
    ap.add_argument("--methods", default="full,lora", help="full, lora, fsdp (full fine-tuning under FSDP2)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="rows per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    r = measure_ddp(a.model, tuple(m.strip() for m in a.methods.split(",") if m.strip()), a.steps, a.batch, a.seq,
                    a.threads, a.world)
    print(f"DDP at {r['world']} ranks (gloo, {a.threads} thread(s) each) on {r['machine']['cpu']}; model "
          f"{a.model}, {a.batch}×{a.seq} tokens per rank per step", file=sys.stderr)
    print(f"{'method':<6} {'trainable':>10} {'MB/step':>8} {'buckets':>7} {'state MB':>8} {'step ms':>8} "
          f"{'compute':>8} {'comm':>7} {'share':>6} {'exposed':>8} {'AR alone':>9} {'tok/s':>8}", file=sys.stderr)
    for x in r["results"]:
        comm = "-" if x["comm_s"] is None else f"{x['comm_s'] * 1e3:.1f}"
        share = "-" if x["comm_share"] is None else f"{x['comm_share']:.1%}"
        mb = f"{x['allreduced_bytes_per_step'] / 1e6:.3f}" + ("" if x["bytes_counted"] else "*")
        print(f"{x['method']:<6} {x['trainable_params']:>10,} {mb:>8} {x['buckets_per_step']:>7} "
              f"{x['state_bytes_per_rank'] / 1e6:>8.1f} {x['step_s'] * 1e3:>8.1f} {x['compute_s'] * 1e3:>8.1f} "
              f"{comm:>7} {share:>6} {x['exposed_comm_s'] * 1e3:>8.1f} {x['allreduce_alone_s'] * 1e3:>9.2f} "
              f"{x['tokens_per_s']:>8,.0f}", file=sys.stderr)
    if any(not x["bytes_counted"] for x in r["results"]):
        print("* FSDP: all-gather ×2 + reduce-scatter of the full size, estimated (no all-reduce to count); its "
              "compute column still includes the all-gathers", file=sys.stderr)
    write_report(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
