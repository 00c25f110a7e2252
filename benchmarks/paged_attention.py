"""The C paged decode attention (attnkit/kernels/attention.c) per KV cache type, against PyTorch's eager gather +
softmax over the same pools (attnkit.engine.paged_attention.paged_decode_attention) in the same run.

One layer's attention — by default the default model's (9 query heads over 3 KV heads of 64; ``--heads``, e.g.
``9/3x64,32/8x64,24/8x128`` for Llama-3.2-1B's and 3B's too) — ``--keys`` keys per sequence in blocks of 16, for 1
and 8 sequences: milliseconds per call (best of five batches) and the largest difference from
the eager result. Pools of float32 and float16 rows, and of q8_0 / q4_0 rows (llama.cpp's -ctk blocks; the eager
side reads their decoded values).

    python benchmarks/paged_attention.py [--keys 400] [--heads 9/3x64] [--threads 2] [--json FILE]
    attnkit bench paged_attention
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import cpu_model, write_report  # noqa: E402


def best_ms(f, reps: int = 50, batches: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=400)
    ap.add_argument("--heads", default="9/3x64", help="query/KV heads x head dim, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from attnkit.engine.kv_format import kv_format
    from attnkit.engine.paged_attention import paged_decode_attention, paged_decode_attention_native

    try:
        shapes = [tuple(int(v) for v in h.replace("x", "/").split("/")) for h in args.heads.split(",")]
    except ValueError:
        ap.error(f"--heads: entries like 9/3x64, got {args.heads}")
    bs = 16
    nb = -(-args.keys // bs)
    rows = []
    print(f"threads {args.threads}, {args.keys} keys")
    print("| heads | KV | sequences | C ms | eager ms | C / eager | max |Δ| |")
    print("|---|---|---|---|---|---|---|")
    for (nh, nkv, hd), name in ((shape, name) for shape in shapes for name in ("float32", "float16", "q8_0", "q4_0")):
        fmt = kv_format(name)
        for B in (1, 8):
            g = torch.Generator().manual_seed(B)
            dense = torch.randn(2, nkv, B * nb, bs, hd, generator=g)
            k_pool, v_pool = (fmt.quantize(x) for x in dense)  # converted, or quantized rows
            k_ref, v_ref = (fmt.dequantize(p) for p in (k_pool, v_pool)) if fmt.quantized else (k_pool, v_pool)
            tables = torch.arange(B * nb).view(B, nb)
            lens, starts = torch.full((B,), args.keys), torch.zeros(B, dtype=torch.long)
            q = torch.randn(nh, B, hd, generator=g)
            bias = torch.where(torch.arange(nb * bs)[None] < lens[:, None], 0.0, float("-inf"))
            with torch.inference_mode():
                out = paged_decode_attention_native(q, k_pool, v_pool, tables, lens, starts, fmt=fmt)
                ref = paged_decode_attention(q, k_ref, v_ref, tables, bias)
                c_ms = best_ms(lambda: paged_decode_attention_native(q, k_pool, v_pool, tables, lens, starts, fmt=fmt))
                e_ms = best_ms(lambda: paged_decode_attention(q, k_ref, v_ref, tables, bias), reps=10)
            r = {"heads": nh, "kv_heads": nkv, "head_dim": hd, "kv": name, "sequences": B, "c_ms": c_ms, "eager_ms": e_ms,
                 "max_abs_diff": float((out - ref.to(out.dtype)).abs().max())}
            rows.append(r)
            print(f"| {nh}/{nkv}×{hd} | {name} | {B} | {c_ms:.3f} | {e_ms:.3f} | {c_ms / e_ms:.2f} | {r['max_abs_diff']:.1e} |", flush=True)
    write_report({"results": rows, "keys": args.keys,
                  "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads}}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
