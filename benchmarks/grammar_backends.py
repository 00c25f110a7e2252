"""xgrammar vs llguidance on this machine: what the engine's constrained decoding would pay for each.

Both libraries compile a JSON schema (or regex, or grammar) against the tokenizer's vocabulary and then, at
every step, fill a bitmask of the tokens allowed next. This measures, with the default model's tokenizer
(SmolLM2, 49 152 tokens) and the same schemas for both:

- import time of the library, in a fresh interpreter (xgrammar imports torch, transformers and triton);
- tokenizer preparation (once per model);
- schema compile time, first and again (the second shows the library's own cache, if any);
- per-step mask time for a batch of ``--batch`` sequences (64), each walking its own random path through the
  grammar (uniform over the allowed tokens, seeded), for ``--steps`` steps: one batched fill call per step,
  plus the time to advance every matcher by its token.

llguidance runs twice: with its defaults, and with its JSON token slices and 2 executor threads (its tuning
for JSON schemas on this machine's 2 cores).

    python benchmarks/grammar_backends.py [--batch 64] [--steps 48] [--json FILE]
    attnkit bench grammar_backends
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model, write_report  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["name", "age", "email", "tags"], "additionalProperties": False},
    "tool-call": {"type": "object", "properties": {
        "name": {"enum": ["get_weather", "search", "send_email"]},
        "arguments": {"anyOf": [
            {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
             "required": ["city"], "additionalProperties": False},
            {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
             "required": ["query"], "additionalProperties": False}]}},
        "required": ["name", "arguments"], "additionalProperties": False},
    "wide-40": {"type": "object", "properties": {
        f"field_{i}": ({"type": "integer"} if i % 3 == 0 else {"type": "number"} if i % 3 == 1 else
                       {"type": "string", "maxLength": 16}) for i in range(40)},
        "required": [f"field_{i}" for i in range(40)], "additionalProperties": False},
}


def default_tokenizer():
    """The default model's tokenizer and vocabulary size, read from its GGUF metadata (no weights loaded)."""
    from attnkit.loading.defaults import default_chat_model
    from attnkit.loading.gguf_file import GGUFFile
    from attnkit.text.tokenizer import Tokenizer

    path = default_chat_model()
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    return tok, tok.vocab_size


def import_seconds(module: str) -> float:
    """Seconds to import ``module`` in a fresh interpreter (the first request's cost in a new server)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int, json_tuned: bool = False) -> None:
        import llguidance
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        slices = llguidance.LLTokenizer.json_slices() if json_tuned else None
        self.tokenizer = llguidance.LLTokenizer(tok.tk.to_str(), n_vocab=vocab, eos_token=sorted(tok.eos_ids),
                                                slices=slices)
        self.executor = llguidance.LLExecutor(num_threads=2 if json_tuned else None)
        self.vocab = vocab

    def compile(self, schema: dict):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tokenizer, g)
        assert not m.is_error(), m.get_error()
        return g

    def matchers(self, compiled, n: int) -> list:
        return [self.llg.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def bitmask(self, n: int):
        return self.lt.allocate_token_bitmask(n, self.vocab)

    def fill(self, matchers, mask) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def accept(self, matchers, tokens) -> None:
        for m, t in zip(matchers, tokens):
            m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_stopped() or m.is_error()


class LLGuidanceJSON(LLGuidance):
    name = "llguidance-json"

    def __init__(self, tok, vocab: int) -> None:
        super().__init__(tok, vocab, json_tuned=True)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int) -> None:
        import transformers
        import xgrammar

        self.xgr = xgrammar
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk)
        info = xgrammar.TokenizerInfo.from_huggingface(fast, vocab_size=vocab, stop_token_ids=sorted(tok.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=2)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, matchers, mask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, mask)

    def accept(self, matchers, tokens) -> None:
        for m, t in zip(matchers, tokens):
            m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated()


def allowed(mask_row, vocab: int):
    import numpy as np

    bits = np.unpackbits(mask_row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def measure(backend_cls, tok, vocab: int, batch: int, steps: int) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    be = backend_cls(tok, vocab)
    setup = time.perf_counter() - t0
    out: dict = {"backend": be.name, "tokenizer_setup_s": round(setup, 3), "schemas": {}}
    rng = np.random.default_rng(0)
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = be.compile(schema)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        be.compile(schema)
        again = time.perf_counter() - t0
        matchers = be.matchers(compiled, batch)
        mask = be.bitmask(batch)
        fills, accepts = [], []
        for _ in range(steps):
            live = [m for m in matchers if not be.done(m)]
            if not live:
                break
            t0 = time.perf_counter()
            be.fill(live, mask)
            fills.append(time.perf_counter() - t0)
            toks = []
            for i in range(len(live)):
                ok = allowed(mask[i], vocab)
                toks.append(int(rng.choice(ok)) if len(ok) else 0)
            t0 = time.perf_counter()
            be.accept(live, toks)
            accepts.append(time.perf_counter() - t0)
        out["schemas"][name] = {
            "compile_ms": round(first * 1e3, 2), "compile_again_ms": round(again * 1e3, 2),
            "fill_ms_per_step": round(statistics.mean(fills) * 1e3, 3),
            "fill_ms_p90": round(sorted(fills)[int(0.9 * (len(fills) - 1))] * 1e3, 3),
            "accept_ms_per_step": round(statistics.mean(accepts) * 1e3, 3), "steps": len(fills)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    tok, vocab = default_tokenizer()
    results, versions = [], {}
    for mod, cls in (("llguidance", LLGuidance), ("llguidance", LLGuidanceJSON), ("xgrammar", XGrammar)):
        if importlib.util.find_spec(mod) is None:
            print(f"{mod}: not installed, skipped (pip install {mod})")
            continue
        versions[mod] = importlib.metadata.version(mod)
        imp = import_seconds(mod)
        r = measure(cls, tok, vocab, args.batch, args.steps)
        r["import_s"] = round(imp, 2)
        results.append(r)
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    print(f"\nbatch {args.batch}, vocab {vocab}, {machine}; {versions}")
    print(f"{'backend':<15} {'schema':<10} {'compile ms':>10} {'again ms':>9} {'mask ms/step':>12} {'p90':>7} "
          f"{'accept ms':>9}")
    for r in results:
        for name, s in r["schemas"].items():
            print(f"{r['backend']:<15} {name:<10} {s['compile_ms']:>10} {s['compile_again_ms']:>9} "
                  f"{s['fill_ms_per_step']:>12} {s['fill_ms_p90']:>7} {s['accept_ms_per_step']:>9}")
        print(f"{r['backend']:<15} import {r['import_s']} s, tokenizer setup {r['tokenizer_setup_s']} s")
    write_report({"benchmark": "grammar_backends", "machine": machine, "python": platform.python_version(),
                  "versions": versions, "batch": args.batch, "vocab": vocab, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
