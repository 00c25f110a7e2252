"""Constrained decoding: token masks from a grammar, with xgrammar (Dong et al. 2024, "XGrammar").

A :class:`~attnkit.engine.sampling_params.StructuredOutputs` is compiled once per distinct spec
(cached) into a pushdown automaton over the model's vocabulary; each constrained sequence gets its
own matcher. Every step the matchers of the batch fill one bitmask (one bit per token: may it come
next?) — in a worker thread while the forward runs — the sampler sets every disallowed logit to
-inf, and each sampled token advances its matcher. xgrammar was chosen over llguidance by
measurement (``benchmarks/grammar_backends.py``, docs/structured_output.md): its per-step mask for
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
        self._compiled: dict[tuple[str, str, bool], Any] = {}
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
        compact = spec.disable_any_whitespace
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(json.dumps(spec.json), any_whitespace=not compact)
            elif kind == "json_object":
                compiled = self.compiler.compile_json_schema(json.dumps(_ANY_OBJECT), any_whitespace=not compact)
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
        thread (it runs while the forward does; xgrammar releases the GIL)."""
        return self._pool.submit(self.fill, [s.grammar for s in seqs])

    def fill(self, matchers: list[Any]) -> torch.Tensor:
        mask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask(matchers, mask)
        return mask

    def close(self) -> None:
        self._pool.shutdown(wait=False)


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
