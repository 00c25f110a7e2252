"""Perplexity of each GGUF block type through attnkit's kernels, against llama.cpp's on the same files.

The default model (SmolLM2-135M-Instruct) is written once as F16 (its Q4_1 blocks decoded), then quantized
into each preset — by llama.cpp's ``llama-quantize`` when ``--llama-bin`` has it (so both systems score the
very same bytes), else by attnkit's own quantizer. Each file is scored on the shipped text the way
``llama-perplexity`` scores it (disjoint chunks of ``--ctx`` tokens, the second half of each scored:
:func:`attnkit.eval.perplexity.chunked_perplexity`), by attnkit with the file's blocks kept under its kernels
(``quantize="gguf"``) — through the engine's prompt path (products on the decoded blocks in bf16/float32) and
through the integer kernel with 8-bit activations, llama.cpp's own arithmetic — and by ``llama-perplexity``
itself when present. The issue's bar: attnkit within 0.5% of llama.cpp's figure for every type. (SmolLM2-135M's width 576 is not a multiple of 256, so in the K presets
llama.cpp — and attnkit's quantizer with it — falls back to Q5_0/Q5_1/Q8_0 for all but the FFN down
projections: those carry the K types here.)

    python benchmarks/perplexity.py [--llama-bin DIR] [--presets Q4_0,Q4_K_M,...] [--ctx 512] [--json FILE]
    attnkit bench perplexity -- --llama-bin /opt/llama.cpp/bin
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

PRESETS = "F16,Q8_0,Q6_K,Q5_K_M,Q5_0,Q5_1,Q4_K_M,Q4_K_S,Q4_0,Q4_1"


def llama_perplexity(binary: Path, model: Path, text: Path, ctx: int, threads: int) -> float | None:
    out = subprocess.run([str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads),
                          "-b", str(ctx)], capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if m is None:
        print(f"llama-perplexity failed on {model.name}: {(out.stderr or out.stdout)[-400:]}", file=sys.stderr)
        return None
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", default=None, help="folder with llama-quantize and llama-perplexity (optional)")
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "attnkit" / "perplexity"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from attnkit.engine.llm import LLM
    from attnkit.eval.perplexity import TEXTS, chunked_perplexity, shipped_text
    from attnkit.loading import defaults
    from attnkit.quant.gguf_quantize import requantize
    from attnkit.quant.row_kernel import rows_are

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tools = Path(args.llama_bin) if args.llama_bin else None
    quantizer = tools / "llama-quantize" if tools and (tools / "llama-quantize").exists() else None
    scorer = tools / "llama-perplexity" if tools and (tools / "llama-perplexity").exists() else None
    if scorer is None:
        print("llama-perplexity not given or not found: llama.cpp's column is skipped", file=sys.stderr)
    f16 = work / "smollm2-135m-f16.gguf"
    if not f16.exists():
        requantize(defaults.default_chat_model(), f16, "F16")
    text_file = work / "text.txt"  # the shipped text without its header, as both systems read it
    text_file.write_text(shipped_text())
    rows = []
    for preset in args.presets.split(","):
        path = f16 if preset == "F16" else work / f"smollm2-135m-{preset}-{'llama' if quantizer else 'attnkit'}.gguf"
        if not path.exists():
            if quantizer:
                subprocess.run([str(quantizer), str(f16), str(path), preset], check=True, capture_output=True)
            else:
                requantize(f16, path, preset)
        t0 = time.perf_counter()
        llm = LLM(path, quantize="gguf")
        ids = llm.tokenizer.encode(shipped_text())
        model = llm.engine.runner.model
        dense = chunked_perplexity(model, ids, args.ctx)  # the engine's prompt path (bf16 / float32 products)
        with rows_are("generated"):  # every row through the integer kernel: llama.cpp's arithmetic
            integer = chunked_perplexity(model, ids, args.ctx)
        t_ours = time.perf_counter() - t0
        theirs = llama_perplexity(scorer, path, text_file, args.ctx, args.threads) if scorer else None
        diff = (lambda p: None if theirs is None else round(100 * (p / theirs - 1), 3))  # noqa: E731
        rows.append({"preset": preset, "file": path.name, "quantizer": "llama-quantize" if quantizer and preset != "F16"
                     else "attnkit", "attnkit_ppl": round(dense.ppl, 4), "attnkit_integer_ppl": round(integer.ppl, 4),
                     "tokens": dense.n_tokens, "llama_cpp_ppl": theirs, "diff_pct": diff(dense.ppl),
                     "integer_diff_pct": diff(integer.ppl), "attnkit_s": round(t_ours, 1)})
        print(f"{preset:8s} attnkit {dense.ppl:9.4f} (integer {integer.ppl:9.4f})  llama.cpp {theirs or '-'}",
              file=sys.stderr)
    pct = (lambda v: "-" if v is None else f"{v:+.2f}%")  # noqa: E731
    print("\n| preset | attnkit PPL (prompt path) | attnkit PPL (integer kernel) | llama.cpp PPL | diff | diff (integer) "
          "| quantizer |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['attnkit_ppl']:.4f} | {r['attnkit_integer_ppl']:.4f} | {r['llama_cpp_ppl'] or '-'} | "
              f"{pct(r['diff_pct'])} | {pct(r['integer_diff_pct'])} | {r['quantizer']} |")
    write_report({"benchmark": "perplexity", "ctx": args.ctx, "threads": args.threads, "text": str(TEXTS),
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
