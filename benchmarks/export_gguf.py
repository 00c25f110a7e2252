"""``attnkit export`` checked against llama.cpp: the perplexity of a LoRA-fine-tuned model as attnkit computes it
and as ``llama-perplexity`` computes it from the exported files.

A LoRA (rsLoRA, r = 8, α = 16, on every linear layer of the blocks) is trained for a few steps on the first half
of the shipped text (or ``--adapter DIR`` is used); the second half is scored. The base is the embedded
SmolLM2-135M-Instruct (Q4_1) unless ``--model``. Rows:

- base: the base GGUF, attnkit vs ``llama-perplexity -m base.gguf``;
- base + LoRA GGUF: attnkit's model with the adapter (unmerged, dequantized base) vs
  ``llama-perplexity -m base.gguf --lora lora.gguf`` (the file of ``attnkit export --lora-gguf``);
- merged <type>: the file of ``attnkit export --gguf --type <type>`` loaded by attnkit vs by llama.cpp.

Both sides score llama-perplexity's way (:func:`attnkit.eval.perplexity.chunked_perplexity`: disjoint chunks of
``--ctx`` tokens, second half of each scored). attnkit runs the dequantized weights in float32; llama.cpp its
quantized kernels (activations rounded to 8 bits for the quantized types), so quantized rows differ by a little.

    python benchmarks/export_gguf.py --llama-perplexity /opt/llama.cpp/bin/llama-perplexity

Measured (2-core shared CPU, SmolLM2-135M Q4_1, 20 steps, 6 chunks of 128 tokens; llama.cpp from
llama_cpp_python 0.3.36's vendor tree):

| model | attnkit PPL | llama.cpp PPL | diff |
|---|---|---|---|
| base | 6.9506 | 6.9154 | +0.51% |
| base + LoRA GGUF (`--lora`) | 6.1056 | 6.1252 | -0.32% |
| merged same (Q4_1) | 6.8284 | 6.8831 | -0.79% |
| merged F16 | 6.1058 | 6.1045 | +0.02% |
| merged Q8_0 | 6.0463 | 6.0416 | +0.08% |

Merging into the base's own 4-bit type loses most of a small LoRA's change (the deltas are below a Q4_1 step):
export such a fine-tune to Q8_0/F16, or keep the base and load the LoRA GGUF.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_model, write_report  # noqa: E402


def llama_perplexity(binary: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int,
                     lora: Path | None = None) -> float | None:
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
           "-t", str(threads)] + (["--lora", str(lora)] if lora else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if m is None:
        print(f"llama-perplexity failed on {model.name}{' --lora ' + lora.name if lora else ''}: "
              f"{(out.stderr or out.stdout)[-600:]}", file=sys.stderr)
        return None
    return float(m.group(1))


def train_lora(base: Path, ids: list[int], out: Path, steps: int, ctx: int) -> Path:
    """A few AdamW steps of an rsLoRA on ``ids`` (random windows of ``ctx`` tokens), saved in HF PEFT format."""
    import torch
    import torch.nn.functional as F

    from attnkit.loading.gguf import load_gguf_model
    from attnkit.peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(load_gguf_model(base), LoraConfig(
        r=8, lora_alpha=16, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    x = torch.tensor(ids)
    for step in range(steps):
        s = int(torch.randint(0, len(ids) - ctx - 1, ()))
        chunk = x[s:s + ctx + 1][None]
        loss = F.cross_entropy(peft(chunk[:, :-1])[0], chunk[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  lora step {step:3d} loss {loss.item():.3f}", file=sys.stderr)
    peft.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-perplexity", default=None, help="path of llama.cpp's llama-perplexity (optional)")
    ap.add_argument("--model", default=None, help="base GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter directory (default: train one for --steps steps)")
    ap.add_argument("--types", default="same,F16,Q8_0", help="merged-file types to export and score")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "attnkit" / "export_gguf"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from attnkit.eval.perplexity import chunked_perplexity, shipped_text
    from attnkit.loading import load_causal_lm
    from attnkit.loading.defaults import default_chat_model
    from attnkit.peft import PeftModel
    from attnkit.quant.gguf_export import export_lora, export_merged

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.model) if args.model else default_chat_model()
    scorer = Path(args.llama_perplexity) if args.llama_perplexity else None
    if scorer is not None and not scorer.is_file():
        print(f"{scorer}: not found", file=sys.stderr)
        scorer = None
    if scorer is None:
        print("llama-perplexity not given or not found: llama.cpp's column is skipped", file=sys.stderr)

    lm = load_causal_lm(base)
    text = shipped_text()
    cut = text.index("\n", len(text) // 2) + 1
    train_text, eval_text = text[:cut], text[cut:]
    text_file = work / "eval.txt"
    text_file.write_text(eval_text)
    eval_ids = lm.tokenizer.encode(eval_text)
    need = args.ctx * args.chunks
    if len(eval_ids) < need:
        args.chunks = len(eval_ids) // args.ctx
        print(f"the text has {len(eval_ids)} tokens: {args.chunks} chunks of {args.ctx}", file=sys.stderr)
    eval_ids = eval_ids[:args.ctx * args.chunks]
    bos = lm.tokenizer.bos_id if lm.tokenizer.encode("a")[:1] == [lm.tokenizer.bos_id] else None

    t0 = time.perf_counter()
    adapter = Path(args.adapter) if args.adapter else train_lora(base, lm.tokenizer.encode(train_text), work / "adapter",
                                                                 args.steps, args.ctx)
    t_train = time.perf_counter() - t0

    def ours(model) -> float:
        return chunked_perplexity(model, eval_ids, args.ctx, bos).ppl

    def theirs(model: Path, lora: Path | None = None) -> float | None:
        return llama_perplexity(scorer, model, text_file, args.ctx, args.chunks, args.threads, lora) if scorer else None

    rows = []

    def row(name: str, file: Path, ppl: float, llama: float | None, export_s: float | None = None) -> None:
        diff = None if llama is None else round(100 * (ppl / llama - 1), 3)
        rows.append({"model": name, "file": file.name, "size_mib": round(file.stat().st_size / 2**20, 1),
                     "attnkit_ppl": round(ppl, 4), "llama_cpp_ppl": llama, "diff_pct": diff, "export_s": export_s})
        print(f"{name:24s} attnkit {ppl:9.4f}  llama.cpp {llama or '-'}", file=sys.stderr)

    row("base", base, ours(lm.model), theirs(base))
    t = time.perf_counter()
    lora_file = work / "lora.gguf"
    info = export_lora(adapter, base, lora_file)
    t_lora = round(time.perf_counter() - t, 2)
    peft = PeftModel.from_pretrained(load_causal_lm(base).model, adapter)
    peft.eval()
    row("base + LoRA GGUF", lora_file, ours(peft), theirs(base, lora_file), t_lora)
    for ty in args.types.split(","):
        out = work / f"merged-{ty}.gguf"
        t = time.perf_counter()
        export_merged(base, out, adapter, ty, threads=args.threads)
        t_exp = round(time.perf_counter() - t, 2)
        row(f"merged {ty}", out, ours(load_causal_lm(out).model), theirs(out), t_exp)

    pct = (lambda v: "-" if v is None else f"{v:+.2f}%")  # noqa: E731
    print(f"\nbase {base.name}, adapter {adapter}, {args.chunks} chunks of {args.ctx} tokens, LoRA alpha in file "
          f"{info['alpha']:g}\n")
    print("| model | file | MiB | attnkit PPL | llama.cpp PPL | diff | export s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['file']} | {r['size_mib']} | {r['attnkit_ppl']:.4f} | {r['llama_cpp_ppl'] or '-'} | "
              f"{pct(r['diff_pct'])} | {r['export_s'] if r['export_s'] is not None else '-'} |")
    write_report({"benchmark": "export_gguf", "base": str(base), "adapter": str(adapter), "lora_alpha": info["alpha"],
                  "ctx": args.ctx, "chunks": args.chunks, "train_steps": 0 if args.adapter else args.steps,
                  "train_s": round(t_train, 1), "llama_perplexity": str(scorer) if scorer else None,
                  "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads}, "rows": rows},
                 args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
