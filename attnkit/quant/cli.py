"""``attnkit quantize IN.gguf OUT.gguf PRESET``: a GGUF file in one of llama-quantize's presets (attnkit's own
quantizer, :mod:`attnkit.quant.gguf_quantize`)."""

from __future__ import annotations

import argparse
import sys
import time


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .gguf_quantize import PRESETS

    p = sub.add_parser("quantize", help="requantize a GGUF file to a llama-quantize preset (Q4_K_M, Q8_0, ...)",
                       description="Write IN's model to OUT with the tensor types llama-quantize gives PRESET "
                                   "(no importance matrix). Presets: " + ", ".join(PRESETS))
    p.add_argument("input", help="GGUF file to read")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("preset", help="one of: " + ", ".join(PRESETS))
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from .gguf_quantize import check_preset, requantize

    preset = check_preset(args.preset)  # ValueError → "attnkit quantize: error: ..."
    if not Path(args.input).is_file():
        print(f"attnkit quantize: error: {args.input}: no such file", file=sys.stderr)
        return 2
    from ..loading.gguf_file import GGUFFile

    quantized = sorted({t.ggml_type.name for t in GGUFFile(args.input).tensors.values()} - {"F32", "F16", "BF16"})
    if quantized and not args.quiet:  # llama-quantize refuses these without --allow-requantize
        print(f"note: {args.input} is already quantized ({', '.join(quantized)}): tensors that change type are "
              "quantized a second time, from their dequantized values; those of the same type are copied", file=sys.stderr)
    t = time.perf_counter()
    types = requantize(args.input, args.output, preset, threads=args.threads, progress=not args.quiet)
    if not args.quiet:
        size = Path(args.output).stat().st_size
        counts = ", ".join(f"{n} {k}" for k, n in Counter(types.values()).most_common())
        print(f"wrote {args.output}: {preset}, {size / 2**20:.1f} MiB, {len(types)} tensors ({counts}) "
              f"in {time.perf_counter() - t:.1f} s")
    return 0
