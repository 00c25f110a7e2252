"""Constrained decoding: token masks from a grammar, with xgrammar (Dong et al. 2024, "XGrammar").

A :class:`~attnkit.engine.sampling_params.StructuredOutputs` is compiled once per distinct spec
(cached) into a pushdown automaton over the model's vocabulary; each constrained sequence gets its
own matcher. Every step the matchers of the batch fill one bitmask (one bit per token: may it come
next?) — in a worker thread while the forward runs — the sampler sets every disallowed logit to
-inf, and each sampled token advances its matcher. xgrammar was chosen over llguidance by
measurement (``benchmarks/grammar_backends.py``, docs/engine.md "Structured outputs"): its per-step mask for
a batch of 64 is 7–12x faster on this machine, and the mask is paid on every token.

xgrammar is imported on the first constrained request (it takes seconds: it imports transformers).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from .sampling_params import SamplingParamsError, StructuredOutputs

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer
    from .sequence import Sequence

# xgrammar accepts any JSON value for "json_object"'s builtin grammar; OpenAI's json_object asks for an object
_ANY_OBJECT = {"type": "object"}

# Whitespace between JSON tokens (unless disable_any_whitespace): at most this many characters per gap. Unbounded
# (xgrammar's default) a model can loop on whitespace for ever: at temperature 1 the tiny random model of the tests
# wrote whitespace until max_tokens in 55 of 64 samples, and real models do too (vllm-project/vllm#12744, #38696:
# why vLLM has disable_any_whitespace). Bounded, every gap ends, and the schema's own bounds bound the text. 20 still lets a
# model pretty-print as it learned to ("\n" and an indentation of 4 to depth 4, or of 2 to depth 9), the same
# order as llama.cpp's JSON grammars (json-schema-to-grammar: one or two newlines, then at most 20 spaces or tabs).
# On the tiny random model, 64 samples of a 5-property schema took a mean of 37 tokens compact, 71 with this bound
# (49 with a bound of 4), all ending.
MAX_JSON_WHITESPACE = 20

# Two holes in xgrammar's JSON strings (0.2.9), closed by editing the EBNF it writes for a schema:
# - a string with minLength/maxLength is a bounded repetition of the class [^"\\\r\n] (upstream issue
#   mlc-ai/xgrammar#800, open): raw control characters (tab, U+000B, ...) pass, which JSON forbids (RFC 8259 §7;
#   json.loads refuses them), and no escape can be written. Each element is made one JSON character again.
# - its negated classes take the UTF-16 surrogates U+D800–U+DFFF as code points: three bytes (ED A0–BF xx) that are
#   not UTF-8, decoded as three U+FFFD (so a maxLength of 6 became 8 characters). Strings exclude them.
# Both were seen at temperature 1 on the tiny random model (tests/test_serve_structured.py).
_STRING_CHARS = {  # xgrammar's class -> JSON's
    r'[^\"\\\r\n]': r'([^\0-\x1f\"\\\ud800-\udfff] | ("\\" ([\"\\/bfnrt] | ("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] '
                    r'[A-Fa-f0-9]))))',
    r'[^\0-\x1f\"\\\r\n]': r'[^\0-\x1f\"\\\ud800-\udfff]',
}


def json_schema_ebnf(xgr: Any, schema: dict, **kw: Any) -> str:
    """xgrammar's EBNF for ``schema`` (``kw``: its from_json_schema options), its string characters JSON's."""
    ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), **kw))
    for loose, strict in _STRING_CHARS.items():
        ebnf = ebnf.replace(loose, strict)
    return ebnf


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """The compiler (with its cache) for one tokenizer, and the per-step batched mask."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int], max_threads: int = 2) -> None:
        import transformers
        import xgrammar

        self.xgr, self.vocab_size = xgrammar, vocab_size
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tk)
        info = xgrammar.TokenizerInfo.from_huggingface(fast, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=max_threads, cache_enabled=True)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=max_threads)
        self._compiled: dict[tuple[str, str, bool, bool], Any] = {}
        self._lock = threading.Lock()  # compile() is called from server threads and the engine's
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled grammar of ``spec`` (cached); an invalid spec raises SamplingParamsError naming it."""
        key = spec.key()
        with self._lock:
            hit = self._compiled.get(key)
        if hit is not None:
            return hit
        kind = spec.kind
        # compact: no whitespace at all (xgrammar's any_whitespace=False alone would make ", " and ": " mandatory,
        # banning the bare '"' a model asked for minified JSON wants next); otherwise bounded free whitespace
        ws = dict(any_whitespace=False, separators=(",", ":")) if spec.disable_any_whitespace else \
            dict(any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        try:
            if kind == "json":
                compiled = self.compiler.compile_grammar(json_schema_ebnf(self.xgr, spec.json, strict_mode=spec.strict,
                                                                          **ws))
            elif kind == "json_object":  # {"type": "object"} declares no properties: any, strict or not
                compiled = self.compiler.compile_grammar(json_schema_ebnf(self.xgr, _ANY_OBJECT, **ws))
            elif kind == "regex":
                compiled = self.compiler.compile_regex(spec.regex)
            elif kind == "choice":
                compiled = self.compiler.compile_grammar(choice_grammar(spec.choice or []))
            elif "::=" in (spec.grammar or ""):
                compiled = self.compiler.compile_grammar(spec.grammar)
            else:
                compiled = self.compiler.compile_lark(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError for a bad spec
            what = {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "grammar": "grammar",
                    "choice": "choice"}[kind]
            msg = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
            raise SamplingParamsError(f"SamplingParams.structured.{kind}: invalid {what}: {msg}") from None
        with self._lock:
            self._compiled[key] = compiled
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill_async(self, seqs: Seq[Sequence]) -> Future[torch.Tensor]:
        """Start filling the (len(seqs), ceil(V/32)) int32 bitmask of the sequences' matchers in the worker
        thread: started before the step's forward, collected after it."""
        return self._pool.submit(self.fill, [s.grammar for s in seqs])

    def fill(self, matchers: list[Any]) -> torch.Tensor:
        mask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask(matchers, mask)
        return mask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``logits[rows[i], t] = -inf`` for every token t whose bit in ``bitmask[i]`` is 0 (in place)."""
    import xgrammar

    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)  # -1: every token allowed
    full[rows] = bitmask
    xgrammar.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1], indices=rows)


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The token ids a bitmask row allows."""
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (words, 32), bit j of word w: 32w + j
    return torch.nonzero(bits.reshape(-1)[:vocab_size])[:, 0]
