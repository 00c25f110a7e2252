"""GGUF block products per block type: attnkit's integer kernels (on rows interleaved in fours where the build has
that product — every type with AVX-512 VNNI, all but Q6_K with AVX2 — else GGUF's row layout; ``--layouts both``
measures each layout in turn) against the dense bf16 (or float32) product on the blocks decoded each call.

The shapes are a Llama-3.2-1B's (2048→8192 gate/up, 8192→2048 down, 2048→2048 q/o, the 49152×2048 tied head),
random valid blocks of each type (attnkit.quant.native.random_blocks). For m = 1 the table gives GB/s of weight
bytes read with the weights cold, as in a decode step (the layer cycles through copies that together exceed the
last-level cache), and hot (the same copy again, from cache); for m = 1, 8, 64 the milliseconds of the kernel
(generated rows: ak_gemv, which hands Q8_0 batches of 8+ rows to the product in its own order), of the engine's
prompt product (kernels/gemm.c, where the type has it: Q4_K, Q5_K, Q6_K, Q8_0 with AVX-512 VNNI) and of the dense
product. Times are the best of five batches (other load on a shared machine only adds time). It also measures the machine's plain read bandwidth (a sum over 512 MB) to compare.

    python benchmarks/gguf_kernels.py [--threads 2] [--types Q4_K,Q6_K,Q5_K,Q8_0] [--rows 1,8,64]
                                      [--layouts auto|row|x4|both] [--json FILE]
    attnkit bench gguf_kernels
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

SHAPES = [(8192, 2048, "gate/up 2048→8192"), (2048, 8192, "down 8192→2048"), (2048, 2048, "q/o 2048→2048"),
          (49152, 2048, "head 49152×2048")]
COLD_BYTES = 160 << 20  # copies of a layer cycled through: well past a 32 MB L3


def seconds(f, budget: float = 0.3, batches: int = 5) -> float:
    """Time of one call of f: the best of ``batches`` batch means, about ``budget`` seconds in all (other work on a
    shared machine only ever adds time)."""
    f()
    t0 = time.perf_counter()
    f()
    reps = max(1, int(budget / batches / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def read_bandwidth() -> float:
    """GB/s of a plain 512 MB float32 sum: the machine's read bandwidth as PyTorch sees it."""
    x = torch.ones(128 << 20)
    return x.numel() * 4 / seconds(lambda: x.sum(), 1.0) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q5_K,Q8_0")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--layouts", default="auto", choices=["auto", "row", "x4", "both"],
                    help="the layers' layout: the build's choice (auto), GGUF's row layout, rows interleaved in fours, "
                         "or both in turn (the A/B of the interleaved products)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from attnkit.kernels import library, native_bf16
    from attnkit.quant.native import GGUFBlockLinear, has_x4, random_blocks
    from attnkit.quant.row_kernel import rows_are

    if library() is None:
        print("gguf_kernels: the C kernels could not be built")
        return 1
    dense_dtype = torch.bfloat16 if native_bf16() else torch.float32
    rows = [int(r) for r in args.rows.split(",")]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    bw = read_bandwidth()
    print(f"threads {args.threads}, load average {load:.2f}, plain read bandwidth {bw:.1f} GB/s, dense product in "
          f"{str(dense_dtype)[6:]}")
    head = "| type | layer | MB | m=1 GB/s cold | m=1 GB/s hot | " + " | ".join(f"m={m} ms" for m in rows)
    head += " | " + " | ".join(f"prompt m={m} ms" for m in rows)
    head += " | " + " | ".join(f"dense m={m} ms" for m in rows) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results = []
    layouts = {"auto": [None], "row": [False], "x4": [True], "both": [False, True]}[args.layouts]
    for kind, (n, k, name), x4 in itertools.product(args.types.split(","), SHAPES, layouts):
        if x4 and not has_x4(kind):
            print(f"| {kind} | {name} | skipped: no interleaved {kind} product in this build |")
            continue
        blocks = random_blocks(kind, n, k)
        layer = GGUFBlockLinear(blocks, kind, k, interleaved=x4)
        nbytes = layer.blocks.numel()
        copies = [layer] + [GGUFBlockLinear(blocks.clone(), kind, k, interleaved=x4)
                            for _ in range(max(1, -(-COLD_BYTES // nbytes)) - 1)]
        dense = GGUFBlockLinear(blocks, kind, k, interleaved=False)
        dense.dense_dtype, dense.kernel_max_rows = dense_dtype, 0  # every call: decode + dense product
        r = {"kind": kind, "layer": name, "out": n, "in": k, "mb": nbytes / 1e6, "interleaved": layer.interleaved}
        with torch.inference_mode():
            x1 = torch.randn(1, k)
            cold = seconds(lambda: [c.kernel_product(x1) for c in copies]) / len(copies)  # each copy once
            r["gbs_cold"] = nbytes / cold / 1e9
            r["gbs_hot"] = nbytes / seconds(lambda: layer.kernel_product(x1)) / 1e9
            for m in rows:
                x = torch.randn(m, k)
                r[f"ms_{m}"] = seconds(lambda: layer.kernel_product(x)) * 1e3
                r[f"dense_ms_{m}"] = seconds(lambda: dense(x)) * 1e3
                if layer.gemm_shape():  # the engine's prompt rows: the integer matrix product
                    with rows_are("prompt"):
                        r[f"gemm_ms_{m}"] = seconds(lambda: layer(x)) * 1e3
        results.append(r)
        copies.clear()
        print(f"| {kind}{' x4' if layer.interleaved else ''} | {name} | {r['mb']:.1f} | {r['gbs_cold']:.1f} | {r['gbs_hot']:.1f} | "
              + " | ".join(f"{r[f'ms_{m}']:.3f}" for m in rows) + " | "
              + " | ".join(f"{r[f'gemm_ms_{m}']:.3f}" if f"gemm_ms_{m}" in r else "—" for m in rows) + " | "
              + " | ".join(f"{r[f'dense_ms_{m}']:.3f}" for m in rows) + " |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    report = {"results": results, "dense_dtype": str(dense_dtype), "read_bandwidth_gbs": bw, "load_average": load,
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "threads": args.threads}}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
