"""Per-request sampling settings, validated before anything runs (the vLLM ``SamplingParams`` idea).

temperature 0 is greedy decoding; otherwise logits/temperature are filtered by top-k (Fan et al.
2018), top-p / nucleus (Holtzman et al. 2020) and min-p (Nguyen et al. 2024), after the repetition
penalty (Keskar et al. 2019, CTRL §4.1) and the OpenAI presence/frequency penalties.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """An invalid sampling setting; the message names the field."""


@dataclass
class StructuredOutputs:
    """Constrain the output to a language (vLLM's ``StructuredOutputsParams``): exactly one of a JSON schema
    (``json``, a dict or its JSON text), any JSON object (``json_object``), a regular expression, a grammar
    (GBNF, recognised by ``::=``, otherwise Lark) or a fixed list of choices. The engine compiles it with
    xgrammar (:mod:`attnkit.engine.grammar`) and masks every disallowed token before sampling.
    ``disable_any_whitespace`` makes JSON compact (no whitespace between tokens: ``,`` and ``:`` alone); otherwise
    a bounded amount of whitespace may stand between JSON tokens (:data:`attnkit.engine.grammar.MAX_JSON_WHITESPACE`).
    ``strict`` (JSON schemas only; OpenAI's ``json_schema.strict``): no properties or array items beyond those
    the schema declares unless it allows them explicitly (``additionalProperties``, ``items``); ``strict=False``
    follows JSON Schema's defaults (an object may carry undeclared properties)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    disable_any_whitespace: bool = False
    strict: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"SamplingParams.structured.{name}: {why}")

        given = [k for k in ("json", "regex", "grammar", "choice") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise SamplingParamsError("SamplingParams.structured: give exactly one of json, json_object, regex, "
                                      f"grammar, choice (got {given or 'none'})")
        for name in ("json_object", "disable_any_whitespace", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if self.json is not None:
            schema: Any = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise bad("json", f"the schema is not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise bad("json", f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
            self.json = schema if isinstance(schema, dict) else {} if schema else {"not": {}}
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise bad(name, "must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise bad("choice", "must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "json_object", "regex", "grammar", "choice") if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool, bool]:
        """What identifies the compiled grammar (the cache key): kind, canonical text, whitespace, strictness
        (the last two matter only to JSON: they are fixed for the other kinds, which compile the same either way)."""
        value = getattr(self, self.kind)
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, bool)) else value
        is_json = self.kind in ("json", "json_object")
        return self.kind, text, self.disable_any_whitespace and is_json, self.strict or self.kind != "json"


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt (they share the prompt's KV blocks)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # reproducible per request whatever else is batched
    stop: list[str] | str | None = None  # stop strings, matched on the text; never shown
    stop_token_ids: list[int] | None = None
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives returned per token (0 = only the sampled one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix-cache reuse then)
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None  # constrained decoding (JSON schema, regex, grammar, choice)
    # StreamingLLM (Xiao et al. 2023): the K/V of the first ``attention_sinks`` tokens (whole blocks) and of the last
    # ``kv_window`` or more are kept, the rest dropped, so the request may run past the context window in bounded
    # memory (attnkit.engine.block_manager.BlockManager.slide); None: every token's K/V is kept
    kv_window: int | None = None
    attention_sinks: int = 4
    # SnapKV (Li et al. 2024): once the prompt is read, its cache keeps the ``kv_budget`` keys per layer and head that
    # its last queries weigh most (attnkit.engine.kv_eviction); earlier only where the context would overflow, or,
    # with ``kv_budget_stream``, after every prefill chunk (reading a stream in memory bounded by the budget)
    kv_budget: int | None = None
    kv_budget_stream: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"SamplingParams.{name}: {why} (got {getattr(self, name)!r})")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 0 (0 or -1 = off)")
        if self.top_k == -1:
            self.top_k = 0
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        if any(not is_int(t) or t < 0 for t in ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        self.stop_token_ids = ids
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "must be an integer in [0, max_tokens]")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be None or an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be None or an integer in [0, 20]")
        bias = dict(self.logit_bias or {})
        if any(not is_int(t) or t < 0 or not is_num(b) or not -100 <= b <= 100 for t, b in bias.items()):
            raise bad("logit_bias", "must map token ids (>= 0) to biases in [-100, 100]")
        self.logit_bias = {int(t): float(b) for t, b in bias.items()}
        if self.kv_window is not None and (not is_int(self.kv_window) or self.kv_window < 1):
            raise bad("kv_window", "must be None or an integer >= 1")
        if not is_int(self.attention_sinks) or self.attention_sinks < 0:
            raise bad("attention_sinks", "must be an integer >= 0")
        if self.kv_budget is not None and (not is_int(self.kv_budget) or self.kv_budget < 1):
            raise bad("kv_budget", "must be None or an integer >= 1")
        if self.kv_budget is not None and self.kv_window is not None:
            raise bad("kv_budget", "takes no kv_window as well (eviction by attention or by recency, not both)")
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise bad("structured", "must be a StructuredOutputs or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named in the settings must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids or []), ("logit_bias", list(self.logit_bias or {}))):
            if any(t >= vocab_size for t in ids):
                raise SamplingParamsError(f"SamplingParams.{name}: token id out of range for vocab size {vocab_size}")
