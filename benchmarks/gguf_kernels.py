"""One GGUF layer's product three ways: the integer kernel on rows interleaved in fours, the same kernel on
GGUF's row layout, and the dense bf16 (or float32) product on the blocks decoded each call.

The shapes are the default model's (gate/up 3072×576, down 576×1536, the Q8_0 output head 49152×576),
random weights quantized with gguf; for 1 to 512 rows of activations. It shows where the integer kernel
stops being faster than the dense product: that sets ``GGUFBlockLinear.decode_max_rows``. Weights are hot
in cache across repeats (a decode step reads them from memory once).

    python benchmarks/gguf_kernels.py [--threads 2] [--rows 1,4,8,16,32,64,512] [--json FILE]
    attnkit bench gguf_kernels
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

SHAPES = [("Q4_1", 3072, 576, "gate/up"), ("Q4_1", 576, 1536, "down"), ("Q8_0", 49152, 576, "output head")]


def ms(f, reps: int = 10) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16,32,64,512")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from attnkit.kernels import library, native_bf16
    from attnkit.quant.native import GGUFBlockLinear

    lib = library()
    if lib is None:
        print("gguf_kernels: the C kernels could not be built")
        return 1
    x4_ok = bool(lib.ak_x4_available())
    dense_dtype = torch.bfloat16 if native_bf16() else torch.float32
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"| layer | rows | interleaved ms | row layout ms | dense {str(dense_dtype)[6:]} ms |")
    print("|---|---|---|---|---|")
    for kind, n, k, name in SHAPES:
        w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
        blocks = torch.from_numpy(quantize(w, getattr(GGMLQuantizationType, kind)).copy())
        plain = GGUFBlockLinear(blocks, kind, k, interleaved=False)
        x4 = GGUFBlockLinear(blocks, kind, k, interleaved=True) if x4_ok else None
        dense = GGUFBlockLinear(blocks, kind, k, interleaved=False)
        dense.dense_dtype = dense_dtype
        dense.kernel_max_rows = 0  # every call through the dense product (an instance attribute: this layer only)
        for m in rows:
            x = torch.randn(m, k)
            with torch.inference_mode():
                r = {"layer": name, "kind": kind, "out": n, "in": k, "rows": m,  # kernel_product: the kernel at any rows
                     "interleaved_ms": ms(lambda: x4.kernel_product(x)) if x4 is not None else None,
                     "row_layout_ms": ms(lambda: plain.kernel_product(x)) if m <= 64 else None,  # slow past that
                     "dense_ms": ms(lambda: dense(x))}
            results.append(r)
            cell = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"| {name} {n}×{k} | {m} | {cell(r['interleaved_ms'])} | {cell(r['row_layout_ms'])} | "
                  f"{cell(r['dense_ms'])} |")
    report = {"results": results, "dense_dtype": str(dense_dtype), "interleaved_available": x4_ok,
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "threads": args.threads}}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
