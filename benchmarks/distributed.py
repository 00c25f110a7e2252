"""Tensor parallelism measured at 2 ranks on this machine, and its cost model projected to 8 GPUs and 2 nodes.

Measured (same run, same GGUF, greedy decode of ``--tokens`` tokens after a ``--prompt``-token prompt):

- one process on ``--threads`` threads: the engine as shipped (the C decode step) and eager (the PyTorch layers,
  the path tensor parallelism takes: the C step has no all-reduce between its layers);
- 2 ranks (gloo, ``--threads``/2 threads each): decode tokens/s, the bytes each rank put into collectives per
  decode token and how many collectives, and each step's time split into communication (rank 0's time inside
  collectives: the transfer plus waiting for the slower rank) and the rest (compute);
- the collectives themselves: an all-reduce of d_model float32 values timed alone (latency α), and of 16 MiB
  (bandwidth β), between the 2 ranks;
- data-parallel training (``benchmarks/distributed_train.py``, when present): bytes all-reduced per step and the
  step split into compute and communication.

Projected, on paper (Megatron-LM's split; a ring all-reduce moves 2(N−1)/N of its payload per rank):

    t_token = W / (N · B_mem)  +  (2L + 1) · (α + 2(N−1)/N · d · b / B_link)  +  (α + V · b / B_link)

with W the weight bytes one token reads, B_mem each device's memory bandwidth, L layers, d = d_model, b bytes per
activation value, V the vocabulary; α and B_link the link's latency and bandwidth. The inputs are printed with
the result; those of other machines are assumptions (flags), not measurements.

Usage: python benchmarks/distributed.py [--model GGUF] [--tokens 32] [--json docs/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_model, write_report  # noqa: E402

SIZES = Path.home() / ".cache" / "attnkit" / "sizes"


def default_model() -> str | None:
    for name in ("llama-3.2-1b-Q4_K_M.lq.gguf", "llama-3.2-1b-Q8_0.lq.gguf"):
        if (SIZES / name).exists():
            return str(SIZES / name)
    return None  # the embedded default


def rss_mb() -> float:
    """This process's resident memory now (MB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _decode(llm, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy request."""
    from attnkit.engine import SamplingParams

    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    t1 = time.perf_counter()
    out = llm.generate([prompt + [7]], SamplingParams(temperature=0, max_tokens=tokens + 1))[0]
    t2 = time.perf_counter()  # the second request's prompt hits the prefix cache: one row, then `tokens` decodes
    return t1 - t0, len(out.token_ids) / (t2 - t1)


def one_process(path: str | None, threads: int, prompt: list[int], tokens: int) -> dict:
    from attnkit.engine import EngineConfig
    from attnkit.engine.llm import LLM
    from attnkit.engine.options import InferenceOptions

    torch.set_num_threads(threads)
    before = rss_mb()
    lm = InferenceOptions().load(path)
    out: dict = {"rss_model_mb": rss_mb() - before}
    for name, native in (("native", True), ("eager", False)):
        llm = LLM.from_model(lm.model, lm.tokenizer, EngineConfig(kv_cache_bytes=256 << 20), eos_ids=set())
        if not native:
            llm.engine.runner.native, llm.engine.runner.native_reason = False, "benchmark: eager"
        prefill, tok_s = _decode(llm, prompt, tokens)
        out[name] = {"prefill_s": prefill, "decode_tok_s": tok_s}
    cfg = lm.model.cfg
    out["shape"] = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab": cfg.vocab_size,
                    "weight_bytes": sum(b.numel() * b.element_size() for b in [*lm.model.parameters(), *lm.model.buffers()])}
    return out


def _rank(rank: int, port: int, path: str | None, threads: int, prompt: list[int], tokens: int, out: str) -> None:
    import torch.distributed as dist

    from attnkit.engine import EngineConfig
    from attnkit.engine.llm import LLM
    from attnkit.engine.options import InferenceOptions
    from attnkit.parallel.engine import attach, serve_worker
    from attnkit.parallel.launch import join_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tp = join_group(rank, 2, threads=threads, timeout_s=600)
    before = rss_mb()
    lm = InferenceOptions().load(path, tp)
    d = lm.model.cfg.d_model
    res: dict = {"rss_model_mb": rss_mb() - before}
    shm = tp.shm
    for transport in ("shm", "gloo"):  # the collective alone: d_model values, then 16 MiB (gloo: over 2 MiB)
        tp.shm = shm if transport == "shm" else None
        if transport == "shm" and shm is None:
            continue
        for name, n in (("alpha", d), ("beta", 4 << 20 if transport == "gloo" else 1 << 20)):
            x = torch.ones(n)
            reps = 200 if name == "alpha" else 10
            tp.all_reduce(x)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                tp.all_reduce(x)
            res[f"{transport}_{name}_s"] = (time.perf_counter() - t0) / reps
        res[f"{transport}_beta_gb_s"] = x.numel() * 4 / res.pop(f"{transport}_beta_s") / 1e9
    tp.shm = shm
    res["transport"] = "shm" if shm is not None else "gloo"
    if rank == 1:
        serve_worker(lm.model, tp)
        dist.destroy_process_group()
        return
    llm = LLM.from_model(lm.model, lm.tokenizer, EngineConfig(kv_cache_bytes=256 << 20), eos_ids=set())
    runner = attach(llm.engine, tp).runner
    from attnkit.engine import SamplingParams

    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))  # prefill; then one cached row + decodes
    tp.reset_counters()
    t0 = time.perf_counter()
    toks = llm.generate([prompt + [7]], SamplingParams(temperature=0, max_tokens=tokens + 1))[0].token_ids
    wall = time.perf_counter() - t0
    steps = len(toks)
    res.update(decode_tok_s=steps / wall, step_s=wall / steps, comm_s_per_step=tp.comm_seconds / steps,
               bytes_per_step=tp.bytes_reduced / steps, collectives_per_step=tp.num_collectives / steps,
               counts=dict(tp.counts), steps=steps)
    runner.close()
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def two_ranks(path: str | None, threads: int, prompt: list[int], tokens: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from attnkit.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(_rank, args=(free_port(), path, max(1, threads // 2), prompt, tokens, out), nprocs=2,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def projection(shape: dict, n: int, b_mem: float, alpha: float, b_link: float, b: int = 2) -> dict:
    """The cost model above for ``n`` devices: seconds per decode token, split in weights and communication."""
    L, d, V, W = shape["n_layers"], shape["d_model"], shape["vocab"], shape["weight_bytes"]
    compute = W / (n * b_mem)
    comm = (2 * L + 1) * (alpha + 2 * (n - 1) / n * d * b / b_link) + (alpha + V * b / b_link)
    return {"devices": n, "compute_s": compute, "comm_s": comm, "tok_s": 1 / (compute + comm),
            "comm_share": comm / (compute + comm), "bytes_per_token": (2 * L + 1) * d * b + V * b // n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model(), help="GGUF file (default: the 1B Q4_K_M of benchmarks/sizes.py "
                                                            "if present, else the embedded default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gpu-mem-gb-s", type=float, default=3350.0, help="assumed HBM bandwidth (H100 SXM: 3350)")
    p.add_argument("--nvlink-gb-s", type=float, default=450.0, help="assumed NVLink bandwidth per direction (NVLink 4)")
    p.add_argument("--nvlink-alpha-us", type=float, default=10.0, help="assumed all-reduce latency within a node")
    p.add_argument("--ib-gb-s", type=float, default=50.0, help="assumed inter-node bandwidth per GPU (400 Gb/s IB)")
    p.add_argument("--ib-alpha-us", type=float, default=30.0, help="assumed all-reduce latency across 2 nodes")
    p.add_argument("--skip-ddp", action="store_true", help="skip the data-parallel training measurement")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    prompt = [(i * 37) % 1000 + 10 for i in range(args.prompt)]
    print(f"model: {args.model or 'embedded default'}; {args.threads} threads", file=sys.stderr)
    one = one_process(args.model, args.threads, prompt, args.tokens)
    tp2 = two_ranks(args.model, args.threads, prompt, args.tokens)
    shape = one.pop("shape")
    L, d = shape["n_layers"], shape["d_model"]
    minimum = 2 * L * d * 4  # 2 all-reduces of d_model float32 values per layer
    rows = [("1 process, C decode step", one["native"]["decode_tok_s"], None, None),
            ("1 process, eager layers", one["eager"]["decode_tok_s"], None, None),
            (f"TP 2 ({tp2['transport']}), eager layers", tp2["decode_tok_s"], tp2["comm_s_per_step"] / tp2["step_s"], tp2["bytes_per_step"])]
    print(f"\n{'run':<28} {'decode tok/s':>12} {'comm share':>10} {'bytes/token':>12}")
    for name, tok_s, share, nbytes in rows:
        print(f"{name:<28} {tok_s:>12.2f} {'' if share is None else f'{share:.0%}':>10} "
              f"{'' if nbytes is None else f'{nbytes:,.0f}':>12}")
    reduces = tp2["counts"].get("all_reduce", 0) / tp2["steps"]
    print(f"per decode token: {tp2['collectives_per_step']:.0f} collectives ({reduces:.0f} all-reduces: 2 per layer = "
          f"{2 * L}, + {reduces - 2 * L:.0f} for the embedding; 1 gather of the logits); the per-layer minimum "
          f"2·L·d·4 = {minimum:,} bytes; the gather V/2·4 = {tp2['bytes_per_step'] - reduces * d * 4:,.0f}")
    print(f"resident memory of the loaded model: one process {one['rss_model_mb']:.0f} MB, rank 0 of 2 "
          f"{tp2['rss_model_mb']:.0f} MB")
    print(f"collectives here ({tp2['transport']} in the run): all-reduce of {d} floats through gloo "
          f"{tp2['gloo_alpha_s'] * 1e6:.0f} µs, 16 MiB at {tp2['gloo_beta_gb_s']:.2f} GB/s"
          + (f"; through shared memory {tp2['shm_alpha_s'] * 1e6:.0f} µs, 4 MiB at {tp2['shm_beta_gb_s']:.2f} GB/s"
             if "shm_alpha_s" in tp2 else ""))
    shape8 = {"n_layers": 32, "d_model": 4096, "vocab": 128256, "weight_bytes": 16e9}  # Llama-3-8B in bf16
    shape70 = {"n_layers": 80, "d_model": 8192, "vocab": 128256, "weight_bytes": 140e9}  # Llama-3-70B in bf16
    proj = []
    for label, shp in (("Llama-3-8B bf16", shape8), ("Llama-3-70B bf16", shape70)):
        proj.append({"model": label, "link": "NVLink, 1 node",
                     **projection(shp, 8, args.gpu_mem_gb_s * 1e9, args.nvlink_alpha_us * 1e-6, args.nvlink_gb_s * 1e9)})
        proj.append({"model": label, "link": "InfiniBand, 2 nodes",
                     **projection(shp, 16, args.gpu_mem_gb_s * 1e9, args.ib_alpha_us * 1e-6, args.ib_gb_s * 1e9)})
    print(f"\nprojection (inputs: HBM {args.gpu_mem_gb_s:.0f} GB/s; NVLink {args.nvlink_gb_s:.0f} GB/s, α "
          f"{args.nvlink_alpha_us:.0f} µs; IB {args.ib_gb_s:.0f} GB/s, α {args.ib_alpha_us:.0f} µs; bf16 activations)")
    print(f"{'model':<18} {'link':<20} {'GPUs':>4} {'weights µs':>10} {'comm µs':>8} {'tok/s':>7} {'comm':>5}")
    for r in proj:
        print(f"{r['model']:<18} {r['link']:<20} {r['devices']:>4} {r['compute_s'] * 1e6:>10.0f} "
              f"{r['comm_s'] * 1e6:>8.0f} {r['tok_s']:>7.0f} {r['comm_share']:>5.0%}")
    ddp = None
    if not args.skip_ddp:
        try:
            from distributed_train import measure_ddp  # benchmarks/distributed_train.py

            ddp = measure_ddp()
            print(f"\ndata-parallel training, {ddp['world']} gloo ranks, model {ddp['model']['name']} "
                  f"({ddp['tokens_per_rank_step']} tokens per rank and step)")
            print(f"{'method':<8} {'all-reduced/step':>16} {'step ms':>8} {'compute ms':>10} {'comm ms':>8} {'comm':>5}")
            for r in ddp["results"]:
                print(f"{r['method']:<8} {r['allreduced_bytes_per_step']:>16,} {r['step_s'] * 1e3:>8.0f} "
                      f"{r['compute_s'] * 1e3:>10.0f} {r['comm_s'] * 1e3:>8.0f} {r['comm_share']:>5.0%}")
        except ImportError as e:
            print(f"data-parallel training: skipped ({e})", file=sys.stderr)
    report = {"machine": {"cpu": cpu_model(), "threads": args.threads}, "model": args.model, "shape": shape,
              "one_process": one, "tp2": tp2, "min_bytes_per_token_layers": minimum, "projection": proj,
              "inputs": {k: getattr(args, k) for k in ("gpu_mem_gb_s", "nvlink_gb_s", "nvlink_alpha_us", "ib_gb_s",
                                                       "ib_alpha_us")},
              "ddp": ddp}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
