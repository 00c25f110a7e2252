"""Chat templates: the model's own Jinja template turns a list of messages into its prompt format.

Rendered as transformers' ``apply_chat_template`` does — jinja2's ``ImmutableSandboxedEnvironment``
(a template from a checkpoint is untrusted code: no attribute access to internals, no mutation of
the inputs), ``trim_blocks``/``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter and
the ``raise_exception`` / ``strftime_now`` helpers templates expect.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(Exception):
    """The model has no chat template, or its template failed to render."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                source: str = "the model", **variables: Any) -> str:
    """The prompt text for ``messages`` (``[{"role": "user", "content": ...}, ...]``).

    ``variables`` are passed to the template (``bos_token``, ``eos_token``, ...).
    """
    if not template:
        raise ChatTemplateError(
            f"{source} has no chat template (neither GGUF tokenizer.chat_template nor a chat_template in "
            "tokenizer_config.json / chat_template.jinja); use `attnkit generate` for plain text completion")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template of {source} failed: {e}") from e
