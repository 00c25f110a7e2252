"""Weight-only quantization on the default model (SmolLM2-135M Q4_1 GGUF): quality, memory and kernel speed.

Quality, per kernel choice — float32, bf16, int8 (every layer requantized), int4 straight from the GGUF's Q4_1
blocks (``quantize="int4"``), int4 requantized from the float32-dequantized model, and ``quantize="gguf"`` (the file's blocks under
attnkit's own C kernel, attnkit.quant.native, which also rounds activations to 8 bits per block of 32): perplexity over the whole shipped
public-domain text (attnkit/data/texts), KL divergence from float32 on its first window, greedy agreement
with float32 over 128 tokens, weight memory. The int4/int8 choices keep an int8 output head. Every row goes
through the kernels (the numerics of decode; ``--dense`` lets windows take the dense path instead, which
multiplies the dequantized weights in float32).

Speed: the matrix–vector (batch 1) and matrix–matrix (batch 64, 512) products at SmolLM2's shapes, each
quantized layer as a user calls it (float32 in, float32 out) through the kernel and through the dense path
(dequantize a slice of rows + float32 F.linear), against float32 and bf16 F.linear. The machine is shared:
every variant runs in turn inside each repetition and the table shows medians.

    python benchmarks/quant.py [--threads 2] [--reps 30] [--skip-quality] [--skip-micro] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (in, out): q/o, k/v, gate/up, down, head
BATCHES = (1, 64, 128, 512)
PROMPT = "The Declaration of Independence says that all men are created equal, and"


def cpu_info() -> dict:
    info = {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["simd"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, StopIteration):
        pass
    return info


def median_us(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median microseconds of each function; the functions take turns inside every repetition."""
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


@torch.inference_mode()
def micro(reps: int) -> list[dict]:
    from attnkit.quant import Int4Linear, Int8Linear, QuantLinear

    rows = []
    g = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.05
        w16 = w.bfloat16()
        q8, q4 = Int8Linear.from_float(w), Int4Linear.from_float(w, group_size=32)
        for m in BATCHES:
            x = torch.randn(m, k, generator=g)
            x16 = x.bfloat16()
            r = max(3, reps // (1 + m * n // 2_000_000))  # fewer repetitions for the big products

            def kernel(q: QuantLinear) -> Callable[[], object]:
                return lambda: q._matmul(x.to(q.compute_dtype))[:, :n].float()  # = forward without the dense switch

            fns = {"f32": lambda: F.linear(x, w), "bf16": lambda: F.linear(x16, w16),
                   "int8": kernel(q8), "int4": kernel(q4), "int8_dense": lambda: q8._dense(x),
                   "int4_dense": lambda: q4._dense(x)}
            us = median_us(fns, r)
            rows.append({"in": k, "out": n, "batch": m, "reps": r, "us": us})
            best = min(us, key=us.get)
            print(f"| {k}→{n} | {m} | " + " | ".join(f"{us[v]:.0f}" for v in fns) + f" | {best} |", flush=True)
    return rows


@torch.inference_mode()
def force_kernels() -> None:
    """Batch-1 numerics for every row: no dense path (which multiplies the dequantized weights in float32)."""
    from attnkit.quant import Int4Linear, Int8Linear

    Int4Linear.dense_min_rows = Int8Linear.dense_min_rows = None
    try:
        from attnkit.quant.native import GGUFBlockLinear

        GGUFBlockLinear.kernel_max_rows = 1 << 30
    except ImportError:
        pass


def quality(window: int, stride: int, n_greedy: int, only: list[str]) -> list[dict]:
    from attnkit.eval import divergence, greedy_agreement, greedy_tokens, perplexity, shipped_text
    from attnkit.loading import load_causal_lm
    from attnkit.quant import model_weight_bytes, quantize_model

    ref = load_causal_lm(None)
    ids = ref.tokenizer.encode(shipped_text())
    prompt = ref.tokenizer.encode(PROMPT)

    def gguf_bf16_dense() -> torch.nn.Module:
        from attnkit.quant.native import set_dense_dtype

        model = load_causal_lm(None, quantize="gguf").model
        set_dense_dtype(model, torch.bfloat16)
        return model

    def requantized() -> torch.nn.Module:
        return quantize_model(load_causal_lm(None).model, "int4", group_size=32)

    choices: dict[str, Callable[[], torch.nn.Module]] = {
        "float32": lambda: ref.model,
        "bf16": lambda: load_causal_lm(None, torch.bfloat16).model,
        "int8": lambda: load_causal_lm(None, quantize="int8").model,
        "int4-gguf": lambda: load_causal_lm(None, quantize="int4").model,
        "int4-requant": requantized,
        "gguf-native": lambda: load_causal_lm(None, quantize="gguf").model,
        "gguf-native-bf16": gguf_bf16_dense,  # the same blocks, dense (prefill) products in bf16: with --dense
    }
    choices = {k: v for k, v in choices.items() if k == "float32" or k in only} if only else choices
    ref_greedy = greedy_tokens(ref.model, prompt, n_greedy)
    out = []
    base = None
    for name, make in choices.items():
        t = time.perf_counter()
        model = make()
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        p = perplexity(model, ids, window, stride)
        ppl_s = time.perf_counter() - t
        div = divergence(ref.model, model, ids[:window])
        ag = greedy_agreement(ref.model, model, prompt, n_greedy, tokens_a=ref_greedy)
        base = p.ppl if base is None else base
        layers = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "in_features")})
        row = {"choice": name, "ppl": p.ppl, "rel": p.ppl / base - 1, "tokens": p.n_tokens, "kl": div.kl,
               "top1": div.top1, "agreement": ag.rate, "prefix": ag.prefix,
               "weight_MB": model_weight_bytes(model) / 1e6, "load_s": load_s, "ppl_s": ppl_s, "layers": layers}
        out.append(row)
        print(f"| {name} | {p.ppl:.3f} | {row['rel']:+.2%} | {div.kl:.4f} | {div.top1:.3f} | {ag.rate:.3f} | "
              f"{ag.prefix} | {row['weight_MB']:.0f} | {load_s:.1f} | {ppl_s:.0f} | {', '.join(layers)} |", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30, help="repetitions per micro-benchmark (fewer for big products)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--greedy", type=int, default=128, help="greedy tokens compared with float32")
    ap.add_argument("--choices", default="", help="comma-separated subset of the quality choices (float32 always first)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--dense", action="store_true", help="let big batches take the dense path in the quality runs "
                    "(default: every row through the kernels, i.e. the numerics of decode)")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the JSON report at the end")
    ap.add_argument("--out-json", default="docs/results/quant.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"machine": cpu_info(), "threads": args.threads}
    print(f"machine: {json.dumps(report['machine'])}, threads {args.threads}")
    if not args.skip_micro:
        print("\nmicroseconds per product, median (x float32 in / float32 out for the quantized layers)\n")
        print("| in→out | batch | f32 F.linear | bf16 F.linear | int8 kernel | int4 kernel | int8 dense | int4 dense | fastest |")
        print("|---|---|---|---|---|---|---|---|---|")
        report["micro"] = micro(args.reps)
    if not args.skip_quality:
        if not args.dense:
            force_kernels()
        print(f"\nperplexity over the shipped text (window {args.window}, stride {args.stride}); "
              f"greedy agreement with float32 over {args.greedy} tokens\n")
        print("| choice | perplexity | vs float32 | KL nats | top-1 | greedy agreement | common prefix | weights MB |"
              " load s | eval s | layers |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        report["quality"] = quality(args.window, args.stride, args.greedy, args.choices.split(",") if args.choices else [])
        report["quality_settings"] = {"window": args.window, "stride": args.stride, "greedy_tokens": args.greedy,
                                      "path": "dense allowed" if args.dense else "kernels forced"}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
