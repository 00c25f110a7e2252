"""``attnkit perplexity``: a model's perplexity on a text as ``llama-perplexity`` scores it, through the engine.

The text is cut into disjoint chunks of ``--ctx`` tokens and the second half of each is scored
(:func:`attnkit.eval.perplexity.engine_perplexity`): the figure llama.cpp prints for the same file and ``-c``,
computed by the engine's own products and K/V cache (what ``LLM`` and ``attnkit serve`` compute), all chunks in
one batch. Without ``--file`` the shipped text is scored (attnkit/data/texts: public-domain, ~3,500 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..engine.options import InferenceOptions


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text, as llama-perplexity scores it")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-f", "--file", default=None, help="a UTF-8 text file (default: the shipped text)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens a chunk (llama-perplexity's -c; default 512)")
    p.add_argument("--bos", action="store_true",
                   help="put the model's BOS token first in every chunk (llama.cpp does where the vocabulary adds one)")
    p.add_argument("--kl-base", default=None, metavar="MODEL",
                   help="also score the KL divergence of --model's token distributions from this model's (e.g. the F16 "
                        "or HF original of a quantized file: llama-perplexity's --kl-divergence), and its own PPL")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    InferenceOptions.add_flags(p)
    p.set_defaults(func=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    from ..engine.llm import LLM
    from .perplexity import engine_perplexity, shipped_text

    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {args.file}: {e}") from None
    else:
        text = shipped_text()
    opts = InferenceOptions.from_args(args)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=opts.dtype, quantize=opts.quantize, threads=opts.threads, compile=opts.compile,
              kv_cache_dtype=opts.kv_cache_dtype, matmul_dtype=opts.matmul_dtype,
              kv_exact_blocks=opts.engine_kv_exact_blocks())
    load_s = time.perf_counter() - t0
    ids = llm.tokenizer.encode(text)
    bos = None
    if args.bos:
        bos = llm.tokenizer.bos_id
        if bos is None:
            raise ValueError("--bos: this model's tokenizer has no BOS token")
    if len(ids) < args.ctx:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {args.ctx}")
    t1 = time.perf_counter()
    p = engine_perplexity(llm, ids, args.ctx, bos)
    score_s = time.perf_counter() - t1
    chunks = len(ids) // args.ctx
    result = {"model": str(llm.path), "ppl": p.ppl, "ppl_std_err": p.ppl_std_err, "nll": p.nll,
              "tokens_scored": p.n_tokens, "chunks": chunks, "ctx": args.ctx, "load_s": round(load_s, 2),
              "score_s": round(score_s, 2), "tokens_per_s": round(chunks * args.ctx / score_s, 1)}
    if args.kl_base is not None:
        result["kl"] = _divergence(args, opts, llm, ids, bos)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{chunks} chunks of {args.ctx} tokens, {p.n_tokens} scored, {result['tokens_per_s']} tokens/s "
              f"(load {load_s:.1f} s)", file=sys.stderr)
        print(f"PPL = {p.ppl:.4f} +/- {p.ppl_std_err or 0:.5f}")
        if "kl" in result:
            k = result["kl"]
            print(f"PPL(base) = {k['base_ppl']:.4f}; ln(PPL/PPL(base)) = {k['ln_ppl_ratio']:.6f}\n"
                  f"Mean KLD = {k['kld']:.6f} +/- {k['kld_std_err']:.6f}; 99% KLD = {k['kld_p99']:.6f}; "
                  f"same top token = {100 * k['same_top']:.2f}%")
    return 0


def _divergence(args: argparse.Namespace, opts: InferenceOptions, llm, ids: list[int], bos: int | None) -> dict:
    """--kl-base: the base model loaded as --model is; both models' distributions outside the engine (float32
    attention), each row through the product the engine gives a prompt's rows; the PPL ratio from those same logits."""
    from ..quant.row_kernel import rows_are
    from .perplexity import chunked_divergence

    base = opts.load(args.kl_base)
    if base.tokenizer is not None and base.tokenizer.encode("Four score and seven years ago") != \
            llm.tokenizer.encode("Four score and seven years ago"):
        raise ValueError(f"--kl-base {args.kl_base}: its tokenizer differs from --model's; KL needs the same tokens")
    model = llm.engine.runner.model
    with rows_are("prompt"):
        d = chunked_divergence(model, base.model, ids, args.ctx, bos)
    return {"base": str(args.kl_base), "base_ppl": math.exp(d.base_nll), "ln_ppl_ratio": d.nll - d.base_nll,
            "kld": d.kl, "kld_std_err": d.kl_std_err, "kld_p99": d.kl_p99, "same_top": d.top1, "tokens": d.n_tokens}
