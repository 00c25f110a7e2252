"""The KV cache under a budget (docs/long_context.md): quantized K/V, attention sinks, SnapKV eviction.

Parts (``--parts``, all by default), on the default model (SmolLM2-135M-Instruct, Q4_1 blocks) unless noted:

- ``bytes``: K+V bytes per cached token for each ``kv_cache_dtype`` (float32, float16, q8_0, q4_0), for the default
  model and the Llama-3.2-1B/3B shapes, and the tokens 1 GiB holds. (llama.cpp's q8_0/q4_0 KV rows are the same
  blocks: the same bytes.)
- ``quality``: perplexity on the shipped text the way ``llama-perplexity`` scores it (``--ctx``-token chunks, the
  second half of each scored), through the engine with float16, q8_0 and q4_0 K/V (q4_0 with its exact blocks,
  attnkit.engine.kv_tail, and without them: "q4_0-plain"), and ``llama-perplexity -ctk X
  -ctv X -fa on`` on the same file when ``--llama-bin`` has it: the change each quantized cache makes, ours
  against theirs. Goals: q8_0 within 0.3% of float16, q4_0 within 2%.
- ``stream``: perplexity by position over a ``--stream``-token stream (the shipped text's tokens repeated) read
  with full K/V (to the model's context), a plain sliding window of ``--window`` (no sinks), attention sinks + that
  window (StreamingLLM), and SnapKV compacting after every chunk (``kv_budget_stream``) at each ``--budgets``. The
  text repeats, so a token's *in-window* reference is its first occurrence under full K/V (no copy of it visible
  yet). Goal: sinks at the stream's end within 10% of that, where the window without sinks degrades sharply.
- ``passkey``: a five-digit key hidden at 10 depths in ``--contexts`` tokens of filler (the shipped text), asked for
  at the end; accuracy with full K/V, SnapKV at each budget (once the prompt is read) and sinks + window.
  Goal: SnapKV at 512 at 4k context ≥ 90% of full K/V's accuracy.
- ``throughput``: the offline workload of ``--requests`` requests (``--prompt`` tokens, ``--gen`` generated) with
  the K/V pool fixed at ``--kv-mib``, so float16 preempts: output tok/s and preemptions for float16, q8_0, q4_0
  (an engine whose exact blocks would take over half the pool is refused: that row is skipped, saying so), q4_0-plain,
  on the default model and on ``--gguf`` files (e.g. a Llama-3.2-1B-shaped Q4_K_M from benchmarks/sizes.py).
  Goal: q8_0 ≥ 1.5× float16.
- ``decode``: single-stream decode at a ``--depth``-token context with each cache type, attnkit against
  ``llama-bench -d DEPTH -ctk X -ctv X -fa on`` in the same run, also as a fraction of the read bandwidth
  (weights + the K/V read per token).

    python benchmarks/long_context.py [--parts bytes,quality,stream,passkey,throughput,decode] [--llama-bin DIR]
        [--gguf FILE ...] [--plots docs/img] [--json FILE]
    attnkit bench long_context -- --llama-bin /opt/llama.cpp/bin
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

KV_TYPES = ("float16", "q8_0", "q4_0")
# what the quality and throughput parts run: each cache type as the engine defaults it (q4_0 reads each query's own
# block exactly, in 32-token blocks: attnkit.engine.kv_tail), and q4_0 without exact blocks (16-token blocks)
KV_VARIANTS = {"float16": ("float16", {}), "q8_0": ("q8_0", {}), "q4_0": ("q4_0", {}),
               "q4_0-plain": ("q4_0", {"kv_exact_blocks": False})}
LLAMA_KV = {"float16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_0-plain": "q4_0"}
SHAPES = {"llama-3.2-1b": (16, 8, 64), "llama-3.2-3b": (28, 8, 128)}  # layers, KV heads, head dim


def bytes_part(llm) -> dict:
    from attnkit.engine.kv_format import kv_format

    cfg = llm.engine.runner.model.cfg
    shapes = {"smollm2-135m": (len(llm.engine.runner.model.layers), cfg.n_kv_heads, cfg.hd), **SHAPES}
    rows = []
    for name, (layers, n_kv, hd) in shapes.items():
        for t in ("float32",) + KV_TYPES:
            per_token = 2 * layers * n_kv * kv_format(t).row_bytes(hd)
            rows.append({"model": name, "kv_cache_dtype": t, "bytes_per_token": per_token,
                         "tokens_per_gib": (1 << 30) // per_token})
    print("\n| model | KV dtype | bytes / token | tokens in 1 GiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv_cache_dtype']} | {r['bytes_per_token']:,} | {r['tokens_per_gib']:,} |")
    return {"rows": rows}


def _token_logprobs(outs) -> list[list[float]]:
    """Each request's prompt logprob of every prompt token after the first."""
    return [[next(iter(d.values())) for d in o.prompt_logprobs[1:]] for o in outs]


def llm_for(path, kv: str, **engine_kw):
    """The engine on ``path`` with the K/V cache of ``kv`` (a KV_VARIANTS name)."""
    from attnkit.engine.llm import LLM

    kv_type, extra = KV_VARIANTS[kv]
    return LLM(path, kv_cache_dtype=kv_type, **extra, **engine_kw)


def chunked_nll(llm, ids: list[int], ctx: int) -> tuple[float, int]:
    """llama-perplexity's score: disjoint ctx-token chunks, the NLL of each chunk's second half; (mean, count)."""
    from attnkit.engine import SamplingParams

    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    outs = llm.generate(chunks, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    nll = [-lp for lps in _token_logprobs(outs) for lp in lps[ctx // 2 - 1:]]
    return sum(nll) / len(nll), len(nll)


def llama_perplexity(tools: Path | None, model: Path, text: Path, ctx: int, kv: str, threads: int) -> float | None:
    binary = tools / "llama-perplexity" if tools else None
    if binary is None or not binary.exists():
        return None
    out = subprocess.run([str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t",
                          str(threads), "-ctk", LLAMA_KV[kv], "-ctv", LLAMA_KV[kv], "-fa", "on"],
                         capture_output=True, text=True, timeout=3600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if m is None:
        print(f"llama-perplexity ({kv}) failed: {(out.stderr or out.stdout)[-300:]}", file=sys.stderr)
    return float(m.group(1)) if m else None


def quality_part(path: Path, ids: list[int], text_file: Path, args) -> dict:
    tools = Path(args.llama_bin) if args.llama_bin else None
    if tools is None or not (tools / "llama-perplexity").exists():
        print("llama-perplexity not given or not found: llama.cpp's column is skipped", file=sys.stderr)
    rows, theirs = [], {}  # llama.cpp's perplexity per -ctk/-ctv type (q4_0-plain shares q4_0's)
    for kv in KV_VARIANTS:
        llm = llm_for(path, kv)
        nll, n = chunked_nll(llm, ids, args.ctx)
        del llm
        if LLAMA_KV[kv] not in theirs:
            theirs[LLAMA_KV[kv]] = llama_perplexity(tools, path, text_file, args.ctx, kv, args.threads)
        rows.append({"kv_cache_dtype": kv, "attnkit_ppl": math.exp(nll), "tokens": n,
                     "llama_cpp_ppl": theirs[LLAMA_KV[kv]]})
    base = rows[0]
    for r in rows:
        r["attnkit_change_pct"] = 100 * (r["attnkit_ppl"] / base["attnkit_ppl"] - 1)
        theirs = r["llama_cpp_ppl"]
        r["llama_cpp_change_pct"] = None if theirs is None or base["llama_cpp_ppl"] is None else \
            100 * (theirs / base["llama_cpp_ppl"] - 1)
    print(f"\n| KV dtype | attnkit PPL (ctx {args.ctx}) | change | llama.cpp PPL | change |\n|---|---|---|---|---|")
    for r in rows:
        lc = r["llama_cpp_ppl"]
        print(f"| {r['kv_cache_dtype']} | {r['attnkit_ppl']:.4f} | {r['attnkit_change_pct']:+.3f}% | "
              f"{'-' if lc is None else f'{lc:.4f}'} | "
              f"{'-' if r['llama_cpp_change_pct'] is None else format(r['llama_cpp_change_pct'], '+.3f') + '%'} |")
    return {"ctx": args.ctx, "rows": rows}


def stream_configs(args) -> dict[str, dict]:
    """The stream's configurations: full K/V (always: the reference), then those ``--stream-configs`` names."""
    w = args.window
    cfgs = {f"window {w}, no sinks": dict(kv_window=w, attention_sinks=0),
            f"4 sinks + window {w}": dict(kv_window=w, attention_sinks=4)}
    for b in args.budgets:
        cfgs[f"SnapKV {b} (every chunk)"] = dict(kv_budget=b, kv_budget_stream=True)
    wanted = args.stream_configs.split(",")
    return {"full K/V": {}, **{k: v for k, v in cfgs.items()
                               if "all" in wanted or any(x.lower() in k.lower() for x in wanted)}}


def stream_part(path: Path, ids: list[int], args) -> dict:
    from attnkit.engine import SamplingParams

    period = len(ids)
    stream = (ids * -(-args.stream // period))[:args.stream]
    res: dict = {"stream_tokens": len(stream), "text_period": period, "window": args.window, "bucket": args.bucket,
                 "configs": {}}
    for name, kw in stream_configs(args).items():
        llm = llm_for(path, "float16", max_num_batched_tokens=args.stream_chunk if kw else 512)
        limit = llm.engine.max_model_len - 1
        toks = stream if kw else stream[:limit]
        t0 = time.perf_counter()
        out = llm.generate([toks], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, **kw))[0]
        nll = [-lp for lp in _token_logprobs([out])[0]]  # nll[i]: token i + 1
        res["configs"][name] = {"nll": nll, "seconds": time.perf_counter() - t0, "positions": len(nll)}
        print(f"{name}: {len(nll)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del llm
    full = res["configs"]["full K/V"]["nll"]
    first = full[:period - 1]  # each token's first occurrence, no copy of it in view yet: the in-window reference

    def ppl(xs):
        return math.exp(sum(xs) / len(xs)) if xs else None

    end = range(len(stream) - 1 - args.bucket, len(stream) - 1)  # nll[i] scores the token at position i + 1
    in_window = ppl([first[(i + 1) % period - 1] for i in end if (i + 1) % period >= 1])
    table = []
    for name, r in res["configs"].items():
        nll = r["nll"]
        buckets = [(lo, ppl(nll[lo:lo + args.bucket])) for lo in range(0, len(nll), args.bucket)]
        r["ppl_by_bucket"] = buckets
        at_end = ppl(nll[end.start:end.stop]) if len(nll) >= end.stop else None
        r["ppl_at_end"] = at_end
        r["end_vs_in_window"] = None if at_end is None else at_end / in_window
        table.append((name, at_end, r["end_vs_in_window"], r["seconds"]))
        del r["nll"]
    res["in_window_ppl_of_the_end_tokens"] = in_window
    print(f"\n| configuration | PPL of the last {args.bucket} tokens | ÷ in-window PPL ({in_window:.3f}) | seconds |"
          "\n|---|---|---|---|")
    for name, at_end, ratio, secs in table:
        print(f"| {name} | {'-' if at_end is None else f'{at_end:.3f}'} | "
              f"{'-' if ratio is None else f'{ratio:.3f}'} | {secs:.0f} |")
    return res


def passkey_prompts(tok, filler: list[int], context: int, depths: list[float], seed: int) -> list[tuple[list[int], str]]:
    import random

    rng = random.Random(seed)
    question = tok.encode("\nWhat is the pass key? The pass key is", add_special_tokens=False)
    out = []
    for d in depths:
        key = str(rng.randint(10000, 99999))
        needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", add_special_tokens=False)
        room = context - len(question) - len(needle)
        hay = (filler * -(-room // len(filler)))[:room]
        at = int(d * room)
        out.append((hay[:at] + needle + hay[at:] + question, key))
    return out


def passkey_part(path: Path, ids: list[int], args) -> dict:
    from attnkit.engine import SamplingParams

    llm = llm_for(path, "float16")
    tok = llm.tokenizer
    depths = [(i + 0.5) / args.trials for i in range(args.trials)]
    cfgs = {"full K/V": {}, **{f"SnapKV {b}": dict(kv_budget=b) for b in args.budgets},
            f"4 sinks + window {min(args.budgets)}": dict(kv_window=min(args.budgets), attention_sinks=4)}
    res: dict = {"contexts": args.contexts, "trials": args.trials, "accuracy": {}}
    for ctx in args.contexts:
        if ctx >= llm.engine.max_model_len:
            print(f"passkey: context {ctx} is past the model's {llm.engine.max_model_len}: skipped", file=sys.stderr)
            continue
        prompts = passkey_prompts(tok, ids, ctx, depths, seed=ctx)
        for name, kw in cfgs.items():
            outs = llm.generate([p for p, _ in prompts], SamplingParams(max_tokens=8, temperature=0, **kw))
            hits = sum(key in o.text for o, (_, key) in zip(outs, prompts))
            res["accuracy"].setdefault(name, {})[ctx] = hits / len(prompts)
            print(f"passkey {ctx} {name}: {hits}/{len(prompts)}", file=sys.stderr)
    print("\n| configuration | " + " | ".join(f"{c} tokens" for c in args.contexts) + " |\n|---|"
          + "---|" * len(args.contexts))
    for name, acc in res["accuracy"].items():
        print(f"| {name} | " + " | ".join(f"{acc.get(c, float('nan')):.0%}" for c in args.contexts) + " |")
    return res


def throughput_part(paths: list[Path], args) -> dict:
    import random

    from attnkit.engine import SamplingParams

    rows = []
    for path in paths:
        for kv in args.kv_types:
            try:
                llm = llm_for(path, kv, kv_cache_bytes=args.kv_mib << 20, max_num_seqs=args.requests)
            except ValueError as e:  # the exact blocks' slots would take more than half of a small pool
                print(f"throughput {path.name} {kv}: skipped: {e}", file=sys.stderr)
                continue
            rng = random.Random(0)
            vocab = llm.engine.vocab_size
            prompts = [[rng.randrange(vocab) for _ in range(args.prompt)] for _ in range(args.requests)]
            params = SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True)
            llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2))  # warm-up
            pre = llm.engine.scheduler.num_preemptions
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            secs = time.perf_counter() - t0
            gen = sum(len(o.token_ids) for o in outs)
            rows.append({"model": path.name, "kv_cache_dtype": kv, "kv_mib": args.kv_mib,
                         "pool_tokens": llm.engine.runner.k_pool.shape[2] * llm.engine.config.block_size,
                         "output_tok_s": gen / secs, "total_tok_s": (gen + args.prompt * args.requests) / secs,
                         "preemptions": llm.engine.scheduler.num_preemptions - pre, "seconds": secs})
            print(f"throughput {path.name} {kv}: {gen / secs:.1f} out tok/s, {rows[-1]['preemptions']} preemptions",
                  file=sys.stderr)
            del llm
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["kv_cache_dtype"] == "float16")
        r["vs_float16"] = r["output_tok_s"] / base["output_tok_s"]
    print(f"\n| model | KV dtype | pool tokens ({args.kv_mib} MiB) | output tok/s | × float16 | preemptions |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv_cache_dtype']} | {r['pool_tokens']:,} | {r['output_tok_s']:.1f} | "
              f"{r['vs_float16']:.2f} | {r['preemptions']} |")
    return {"requests": args.requests, "prompt": args.prompt, "gen": args.gen, "rows": rows}


def llama_bench_decode(tools: Path | None, path: Path, depth: int, kv: str, threads: int, n: int) -> float | None:
    binary = tools / "llama-bench" if tools else None
    if binary is None or not binary.exists():
        return None
    out = subprocess.run([str(binary), "-m", str(path), "-p", "0", "-n", str(n), "-d", str(depth), "-t", str(threads),
                          "-ctk", LLAMA_KV[kv], "-ctv", LLAMA_KV[kv], "-fa", "on", "-o", "csv", "-r", "2"],
                         capture_output=True, text=True, timeout=3600)
    rows = [line for line in out.stdout.splitlines() if line and not line.startswith("build_commit")]
    try:
        import csv

        rec = list(csv.DictReader(out.stdout.splitlines()))
        return float(rec[-1]["avg_ts"])
    except (KeyError, IndexError, ValueError):
        print(f"llama-bench ({kv}) failed: {(out.stderr or '')[-300:]} {rows[-1:] }", file=sys.stderr)
        return None


def decode_part(paths: list[Path], args, bandwidth: float | None) -> dict:
    import random

    from attnkit.engine import SamplingParams
    from attnkit.engine.kv_format import kv_format

    tools = Path(args.llama_bin) if args.llama_bin else None
    if tools is None or not (tools / "llama-bench").exists():
        print("llama-bench not given or not found: llama.cpp's column is skipped", file=sys.stderr)
    rows = []
    for path in paths:
        for kv in KV_TYPES:
            llm = llm_for(path, kv)
            model = llm.engine.runner.model
            cfg = model.cfg
            rng = random.Random(1)
            prompt = [rng.randrange(llm.engine.vocab_size) for _ in range(args.depth)]
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))  # the prompt's K/V, then cached
            params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
            t0 = time.perf_counter()
            out = llm.generate([prompt], params)[0]
            m = out.metrics
            decode_s = (m.finish_time - m.first_token_time) if m and m.first_token_time else time.perf_counter() - t0
            tok_s = (len(out.token_ids) - 1) / decode_s
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
                b.numel() * b.element_size() for b in model.buffers())
            kv_read = 2 * len(model.layers) * cfg.n_kv_heads * kv_format(kv).row_bytes(cfg.hd) * (args.depth + 32)
            theirs = llama_bench_decode(tools, path, args.depth, kv, args.threads, args.decode_tokens)
            rows.append({"model": path.name, "kv_cache_dtype": kv, "depth": args.depth, "attnkit_tok_s": tok_s,
                         "llama_cpp_tok_s": theirs, "bytes_per_token": weights + kv_read, "kv_bytes_read": kv_read,
                         "bandwidth_fraction": None if not bandwidth else tok_s * (weights + kv_read) / 1e9 / bandwidth})
            print(f"decode {path.name} {kv} @ {args.depth}: attnkit {tok_s:.1f} tok/s, llama.cpp {theirs}", file=sys.stderr)
            del llm
    print(f"\n| model | KV dtype | attnkit tok/s @ {args.depth} | llama.cpp tok/s | attnkit ÷ llama.cpp | "
          "of read bandwidth |\n|---|---|---|---|---|---|")
    for r in rows:
        lc = r["llama_cpp_tok_s"]
        frac = r["bandwidth_fraction"]
        ours = r["attnkit_tok_s"]
        print(f"| {r['model']} | {r['kv_cache_dtype']} | {ours:.1f} | {'-' if lc is None else f'{lc:.1f}'} | "
              f"{'-' if lc is None else f'{ours / lc:.2f}'} | {'-' if frac is None else f'{frac:.0%}'} |")
    return {"rows": rows, "read_gb_s": bandwidth}


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    if "stream" in report:
        s = report["stream"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in s["configs"].items():
            xs = [lo + s["bucket"] / 2 for lo, p in r["ppl_by_bucket"]]
            ax.plot(xs, [p for _, p in r["ppl_by_bucket"]], label=name, marker=".")
        ax.axhline(s["in_window_ppl_of_the_end_tokens"], color="grey", ls=":",
                   label=f"in-window PPL of the last {s['bucket']} tokens (their first pass, full K/V)")
        ax.set_yscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel(f"perplexity per {s['bucket']} tokens")
        ax.set_title(f"SmolLM2-135M over {s['stream_tokens']:,} tokens (the shipped text repeated)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "long_context_stream.png", dpi=110)
    if "passkey" in report:
        p = report["passkey"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, acc in p["accuracy"].items():
            cs = sorted(acc)
            ax.plot(cs, [acc[c] for c in cs], marker="o", label=name)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "long_context_passkey.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bytes,quality,stream,passkey,throughput,decode")
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded default model)")
    ap.add_argument("--gguf", nargs="*", default=[], help="more GGUF files for the throughput and decode parts")
    ap.add_argument("--llama-bin", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="quality: the perplexity chunk")
    ap.add_argument("--stream", type=int, default=20000)
    ap.add_argument("--stream-chunk", type=int, default=64, help="tokens per step while a budgeted stream is read")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stream-configs", default="all", help="stream: all, or names to run (substrings: window,sinks,snapkv)")
    ap.add_argument("--bucket", type=int, default=1000)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--kv-mib", type=int, default=48, help="throughput: the K/V pool's size")
    ap.add_argument("--kv-types", type=lambda s: s.split(","), default=list(KV_VARIANTS),
                    help=f"throughput: the K/V variants to run (of {','.join(KV_VARIANTS)}; float16 is the baseline)")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--plots", default=None, help="folder for the PNGs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if "float16" not in args.kv_types or set(args.kv_types) - set(KV_VARIANTS):
        ap.error(f"--kv-types: names of {','.join(KV_VARIANTS)}, float16 among them, got {','.join(args.kv_types)}")

    import torch

    from attnkit.engine.llm import LLM
    from attnkit.eval.perplexity import shipped_text
    from attnkit.loading import defaults
    from sizes import child_bandwidth, machine_info

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    path = Path(args.model) if args.model else Path(defaults.default_chat_model())
    text = shipped_text()
    text_file = Path.home() / ".cache" / "attnkit" / "long_context_text.txt"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text(text)
    probe = LLM(path)
    ids = probe.tokenizer.encode(text, add_special_tokens=False)
    report: dict = {"benchmark": "long_context", "model": path.name, "machine": machine_info(args.threads),
                    "text_tokens": len(ids)}
    if "bytes" in parts:
        report["bytes"] = bytes_part(probe)
    del probe
    bandwidth = child_bandwidth(args.threads)["read_gb_s"] if "decode" in parts else None
    if "quality" in parts:
        report["quality"] = quality_part(path, ids, text_file, args)
    if "stream" in parts:
        report["stream"] = stream_part(path, ids, args)
    if "passkey" in parts:
        report["passkey"] = passkey_part(path, ids, args)
    if "throughput" in parts:
        report["throughput"] = throughput_part([path] + [Path(p) for p in args.gguf], args)
    if "decode" in parts:
        report["decode"] = decode_part([path] + [Path(p) for p in args.gguf], args, bandwidth)
    if args.plots:
        plots(report, Path(args.plots))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
