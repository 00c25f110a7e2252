"""Held-out accuracy of a fine-tuned chat model on a generated task: greedy answers, exact match."""

from __future__ import annotations

import time
from typing import Any, Callable

from ..decoding.generate import SamplingParams, generate
from ..text.chat_template import render_chat


def chat_prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = render_chat(tok.chat_template, messages, add_generation_prompt=True,
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    return tok.encode(text, add_special_tokens=False)


def task_accuracy(model: Any, tok: Any, stop_ids: set[int], examples: list[tuple[str, Any]],
                  messages: Callable[[str], list[dict[str, str]]], score: Callable[[str, Any], tuple[bool, bool]],
                  max_new_tokens: int = 32, show: int = 3) -> dict:
    """Greedy-decode each example's answer; ``score(text, label)`` → (valid format, correct)."""
    model.eval()
    valid = correct = 0
    samples = []
    t0 = time.perf_counter()
    for text, label in examples:
        ids = chat_prompt_ids(tok, messages(text))
        out = list(generate(model, ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), stop_ids))
        answer = tok.decode(out)
        v, c = score(answer, label)
        valid += v
        correct += c
        if len(samples) < show:
            samples.append({"input": text, "output": answer, "correct": c})
    n = len(examples)
    return {"accuracy": correct / n, "valid_format": valid / n, "n": n, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 1)}
