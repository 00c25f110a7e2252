"""Where a 4-bit K/V cache loses its perplexity (docs/long_context.md, "Why q4_0 K/V costs 8%").

The default model reads the shipped text in ``--ctx``-token chunks, once with exact K/V and once per variant with
K and/or V passed through a quantizer before attention (quantize, then dequantize: the values the pool would give
back). Reported: the mean KL divergence of every position's next-token distribution from the exact one (a much
less noisy measure than perplexity on 4k tokens), and the perplexity change on the second half of each chunk
(``llama-perplexity``'s score, as the ``quality`` part of benchmarks/long_context.py) and on every position.

Variants (``K,V[,option…]``; each of K and V one of ``exact``, ``q8_0``, ``q4_0``, ``q4_1``, ``kivi16``):

- ``q8_0`` / ``q4_0``: llama.cpp's KV blocks, one scale per 32 values of a token, Hadamard-rotated as the engine
  stores them (``norot``: not rotated); ``q4_1``: a scale and a minimum per 32.
- ``kivi16``: KIVI's key quantization (Liu et al. 2024): per *channel*, asymmetric, over groups of 16 tokens.
- ``own``: each query sees the keys of its own 16-token block exactly, earlier blocks quantized (``own2``: its own
  block and the one before; ``blockN``: N-token blocks; ``q8tail``: the own block's rows as q8_0, the engine's
  exact blocks, attnkit.engine.kv_tail; ``keysonly``: the window's values quantized all the same); ``recentN``: the N
  most recent keys exact (KIVI's full-precision residual).

    python benchmarks/kv_quant_ablation.py [--ctx 1024] [--json FILE] [VARIANT ...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_report  # noqa: E402

DEFAULT_VARIANTS = ["q8_0,q8_0", "q4_0,q4_0", "q4_0,q4_0,norot", "q4_0,exact", "exact,q4_0", "q4_1,exact",
                    "kivi16,exact,norot", "kivi16,q4_0,norot", "q4_0,q4_0,own", "q4_0,q4_0,own2",
                    "q4_0,q4_0,recent16", "q4_0,q4_0,recent32", "q4_0,q4_0,own,q8tail",
                    "q4_0,q4_0,own,block32,q8tail"]
QK = 32


def q4_1(b):
    """Blocks (…, 32) → q4_1's values (a scale and a minimum per 32; not a KV format attnkit stores)."""
    import torch

    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d, lo = ((hi - lo) / 15).half().float(), lo.half().float()
    return ((b - lo) / torch.where(d > 0, d, torch.ones_like(d))).round().clamp(0, 15) * d + lo


def fake_quant(x, name: str | None, rotate: bool):
    """x (1, n_kv, T, hd) → the values a pool of ``name`` gives back (None: x)."""
    import torch

    from attnkit.engine.kv_format import hadamard64, kv_format

    if name is None:
        return x
    xf = x.float()
    if name == "kivi16":  # per channel over 16-token groups, asymmetric (T a multiple of 16)
        g = xf.reshape(*xf.shape[:-2], xf.shape[-2] // 16, 16, xf.shape[-1])
        lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
        d, lo = ((hi - lo) / 15).half().float(), lo.half().float()
        y = ((g - lo) / torch.where(d > 0, d, torch.ones_like(d))).round().clamp(0, 15) * d + lo
        return y.reshape(x.shape).to(x.dtype)
    if rotate:
        xf = hadamard64(xf)
    if name == "q4_1":
        y = q4_1(xf.reshape(*xf.shape[:-1], xf.shape[-1] // QK, QK)).reshape(xf.shape)
    else:  # the engine's own rows (attnkit.engine.kv_format: ggml's rounding)
        fmt = kv_format(name)
        y = fmt.dequantize(fmt.quantize(xf))
    return (hadamard64(y) if rotate else y).to(x.dtype)


class FakeQuantCache:
    """A cache for one forward over one chunk: attention over K/V passed through the variant's quantizers, each
    query seeing its exact window (``own`` blocks / ``recent`` keys) unquantized."""

    attends = True

    def __init__(self, k: str | None, v: str | None, rotate: bool, own: int = 0, recent: int = 0, block: int = 16,
                 tail: str | None = None, keys_only: bool = False) -> None:
        self.k, self.v, self.rotate, self.own, self.recent, self.block, self.tail = k, v, rotate, own, recent, block, tail
        self.keys_only = keys_only  # the exact window holds keys only: every value as quantized

    def attend(self, q, k, v):
        import torch
        import torch.nn.functional as F

        kq, vq = fake_quant(k, self.k, self.rotate), fake_quant(v, self.v, self.rotate)
        if not (self.own or self.recent):
            return F.scaled_dot_product_attention(q, kq, vq, is_causal=True, enable_gqa=True)
        g, T = q.shape[1] // k.shape[1], k.shape[-2]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        exact = ((j // self.block > i // self.block - self.own) if self.own else (j > i - self.recent)) & (j <= i)
        older = (j <= i) & ~exact
        if self.tail:  # the exact window's rows as the engine's tail keeps them
            k, v = fake_quant(k, self.tail, self.rotate), fake_quant(v, self.tail, self.rotate)
        k, v, kq, vq = (t.repeat_interleave(g, 1).float() for t in (k, v, kq, vq))
        scale = q.shape[-1] ** -0.5
        s = torch.where(exact, q.float() @ k.transpose(-1, -2), q.float() @ kq.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~(exact | older), float("-inf")), -1)
        if self.keys_only:
            return (p @ vq).to(q.dtype)
        return (torch.where(exact, p, 0) @ v + torch.where(older, p, 0) @ vq).to(q.dtype)


def parse(variant: str) -> dict:
    k, v, *opts = variant.split(",")
    own = next((int(o[3:] or 1) for o in opts if o.startswith("own")), 0)
    recent = next((int(o[6:]) for o in opts if o.startswith("recent")), 0)
    block = next((int(o[5:]) for o in opts if o.startswith("block")), 16)
    return {"k": None if k == "exact" else k, "v": None if v == "exact" else v, "rotate": "norot" not in opts,
            "own": own, "recent": recent, "block": block, "tail": "q8_0" if "q8tail" in opts else None,
            "keys_only": "keysonly" in opts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from attnkit.engine.llm import LLM
    from attnkit.eval.perplexity import shipped_text
    from sizes import machine_info

    torch.set_num_threads(args.threads)
    llm = LLM(kv_cache_dtype="float32")
    model, ctx = llm.engine.model, args.ctx
    ids = llm.tokenizer.encode(shipped_text(), add_special_tokens=False)
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]

    @torch.inference_mode()
    def logprobs(opts: dict | None) -> list:
        out = []
        for ch in chunks:
            cache = [FakeQuantCache(**opts) if opts else FakeQuantCache(None, None, False) for _ in model.layers]
            lg = model(torch.tensor([ch]), cache=cache, positions=torch.arange(ctx))
            out.append(torch.log_softmax(lg[0].float(), -1))
        return out

    def nll(lps: list, half: bool) -> float:
        tot, n = 0.0, 0
        for lp, ch in zip(lps, chunks):
            s = ctx // 2 - 1 if half else 0
            tgt = torch.tensor(ch[s + 1:])
            tot -= lp[s:-1].gather(-1, tgt[:, None]).sum().item()
            n += len(tgt)
        return tot / n

    exact = logprobs(None)
    base_half, base_all = nll(exact, True), nll(exact, False)
    rows = []
    print(f"exact K/V: PPL {math.exp(base_half):.4f} (second halves), {math.exp(base_all):.4f} (all positions)")
    print("\n| variant | KL divergence | PPL change (second halves) | PPL change (all) |\n|---|---|---|---|")
    for variant in args.variants:
        t = time.perf_counter()
        lps = logprobs(parse(variant))
        kld = sum((e.exp() * (e - x)).sum().item() for e, x in zip(exact, lps)) / sum(e.shape[0] for e in exact)
        row = {"variant": variant, "kld": kld, "ppl_change_half_pct": 100 * math.expm1(nll(lps, True) - base_half),
               "ppl_change_all_pct": 100 * math.expm1(nll(lps, False) - base_all), "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"| {variant} | {kld:.4f} | {row['ppl_change_half_pct']:+.2f}% | {row['ppl_change_all_pct']:+.2f}% |",
              flush=True)
    write_report({"benchmark": "kv_quant_ablation", "machine": machine_info(args.threads), "ctx": ctx,
                  "exact_ppl_half": math.exp(base_half), "exact_ppl_all": math.exp(base_all), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
