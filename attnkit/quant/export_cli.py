"""``attnkit export``: a fine-tuned model back to llama.cpp (:mod:`attnkit.quant.gguf_export`).

    attnkit export --gguf merged.gguf [--model BASE] [--adapter DIR] [--type same|Q8_0|Q4_K_M|F16|...]
    attnkit export --lora-gguf lora.gguf --adapter DIR [--model BASE] [--lora-type F32|F16|BF16]
"""

from __future__ import annotations

import argparse
import sys
import time


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .gguf_quantize import PRESETS

    p = sub.add_parser("export", help="write a merged GGUF model or a llama.cpp LoRA GGUF (for llama.cpp)",
                       description="Write BASE with ADAPTER merged as one GGUF file (--gguf), and/or the LoRA adapter "
                                   "in llama.cpp's LoRA GGUF format (--lora-gguf, for llama-cli/llama-server --lora).")
    p.add_argument("--model", default=None, help="base model: a GGUF file or a Hugging Face directory "
                                                 "(llama, mistral, qwen2, qwen3) (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--adapter", default=None, help="adapter directory in HF PEFT format (attnkit finetune's OUT/adapter)")
    p.add_argument("--gguf", default=None, metavar="OUT.gguf", help="write the merged model here")
    p.add_argument("--type", default="same", help="tensor types of --gguf: 'same' (each tensor keeps the base's type) "
                                                  "or a preset: " + ", ".join(PRESETS))
    p.add_argument("--lora-gguf", default=None, metavar="OUT.gguf", help="write the LoRA adapter as llama.cpp's LoRA GGUF")
    p.add_argument("--lora-type", default="F32", choices=["F32", "F16", "BF16"], help="tensor type of --lora-gguf")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from .gguf_export import export_lora, export_merged

    if not args.gguf and not args.lora_gguf:
        print("attnkit export: error: give --gguf OUT.gguf and/or --lora-gguf OUT.gguf", file=sys.stderr)
        return 2
    if args.lora_gguf and not args.adapter:
        print("attnkit export: error: --lora-gguf needs --adapter DIR", file=sys.stderr)
        return 2
    if args.model is None:
        from ..loading.defaults import default_chat_model

        args.model = str(default_chat_model())
    if args.gguf:
        t = time.perf_counter()
        types = export_merged(args.model, args.gguf, args.adapter, args.type, args.threads, progress=not args.quiet)
        if not args.quiet:
            counts = ", ".join(f"{n} {k}" for k, n in Counter(types.values()).most_common())
            print(f"wrote {args.gguf}: {Path(args.gguf).stat().st_size / 2**20:.1f} MiB, {len(types)} tensors ({counts})"
                  f"{' with ' + args.adapter + ' merged' if args.adapter else ''} in {time.perf_counter() - t:.1f} s")
    if args.lora_gguf:
        info = export_lora(args.adapter, args.model, args.lora_gguf, args.lora_type)
        if not args.quiet:
            print(f"wrote {args.lora_gguf}: {len(info['tensors']) // 2} LoRA pairs, adapter.lora.alpha = {info['alpha']:g}")
    return 0
