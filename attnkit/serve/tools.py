"""OpenAI tool calling on /v1/chat/completions: what the template sees, what the grammar forces, how output is read.

**Rendering.** A template that mentions ``tools`` gets them as transformers passes them (the request's
``[{"type": "function", "function": {...}}]``), assistant ``tool_calls`` with ``function.arguments``
parsed to a dict (as those templates expect) and ``tool`` messages with their ``tool_call_id`` (and the
called function's ``name``). Any other template (the default SmolLM2's) gets llama.cpp's "generic"
treatment in the Hermes format: a system block listing the tools and asking for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, past calls written that way into the
assistant's content, and tool results as a user turn of ``<tool_response>...</tool_response>``.
tool_choice "none" renders no tools (the model is not offered any).

**Reading.** "auto": the family's format, detected from the template text (:func:`detect_format`), is
parsed by :mod:`attnkit.serve.tool_parsers`. "required" and a named function are enforced by the grammar,
as vLLM does: a named choice's output IS the arguments (its ``parameters`` schema); "required" outputs a
JSON array of ``{"name": <const>, "parameters": <its schema>}`` (at least one; exactly one when
``parallel_tool_calls`` is false). These grammars allow no free whitespace.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling_params import StructuredOutputs
from .errors import bad_request
from .protocol import ChatCompletionRequest, NamedToolChoice
from .tool_parsers import NamedParser, StreamParser, parse

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def detect_format(template: str | None) -> str:
    """The tool-call format a chat template teaches: ``mistral`` (``[TOOL_CALLS]``), ``hermes``
    (``<tool_call>``), ``llama3`` (``<|python_tag|>`` / ``ipython``); ``hermes`` when it shows none."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def supports_tools(template: str | None) -> bool:
    """Does the template render ``tools`` itself (transformers' convention)?"""
    return bool(re.search(r"\btools\b", template or ""))


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolSetup:
    """A request's tool calling: ``mode`` "auto", "required" or "named" (``function``), the ``format`` of "auto",
    the ``structured`` grammar of the forced modes."""

    mode: str
    format: str
    names: list[str]
    function: str | None = None
    structured: StructuredOutputs | None = field(default=None, repr=False)

    def parser(self) -> StreamParser | NamedParser:
        """A fresh incremental parser for one choice's text."""
        if self.mode == "named":
            return NamedParser(self.function or "")
        return StreamParser("json_array" if self.mode == "required" else self.format, self.names)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """A finished text as (content or None, OpenAI ``tool_calls``)."""
        content, calls = parse(self.parser(), text)
        return (content or None) if calls else content, [openai_call(c) for c in calls]

    @staticmethod
    def finish_reason(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason


def openai_call(call: dict[str, Any], id: str | None = None) -> dict[str, Any]:
    return {"id": id or call_id(), "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _parameters(req: ChatCompletionRequest, i: int) -> dict[str, Any]:
    params = req.tools[i].function.parameters  # type: ignore[index]
    if params is None:
        return dict(NO_ARGUMENTS)
    if params.get("type", "object") != "object":
        raise bad_request(f"tools[{i}].function.parameters must be a JSON schema of an object (type \"object\"), "
                          f"got type {params.get('type')!r}", f"tools.{i}.function.parameters")
    return {"type": "object", **params}


def setup_tools(req: ChatCompletionRequest, template: str | None) -> ToolSetup | None:
    """The request's tool calling (None: the model is offered no tools); bad tools are a 400 naming ``tools``."""
    tools = req.tools or []
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice == "none" or not tools:
        return None
    schemas = [_parameters(req, i) for i in range(len(tools))]
    names = [t.function.name for t in tools]
    fmt = detect_format(template) if supports_tools(template) else "hermes"
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        spec = StructuredOutputs(json=schemas[names.index(name)], disable_any_whitespace=True)
        return ToolSetup("named", fmt, names, name, spec)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "parameters": s},
                  "required": ["name", "parameters"], "additionalProperties": False} for n, s in zip(names, schemas)]
        array = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if not req.parallel_tool_calls:
            array["maxItems"] = 1
        return ToolSetup("required", fmt, names, None, StructuredOutputs(json=array, disable_any_whitespace=True))
    return ToolSetup("auto", fmt, names)


def _arguments(i: int, j: int, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                          f"messages.{i}.tool_calls.{j}.function.arguments") from None


def _mistral_id(id: str) -> str:
    """Mistral's templates insist on 9 alphanumeric characters."""
    return re.sub(r"[^a-zA-Z0-9]", "", id)[-9:].rjust(9, "0")


def render_inputs(req: ChatCompletionRequest, template: str | None,
                  setup: ToolSetup | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the messages, the extra template variables) that render ``req`` through ``template``."""
    native = supports_tools(template)
    fmt = detect_format(template)
    names: dict[str, str] = {}  # call id -> function name
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text}
        if m.tool_calls:
            calls = []
            for j, c in enumerate(m.tool_calls):
                names[c.id] = c.function.name
                calls.append({"id": _mistral_id(c.id) if fmt == "mistral" else c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(i, j, c.function.arguments)}})
            if native:
                msg["tool_calls"] = calls
            else:
                blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) for c in calls]
                msg["content"] = "\n".join([m.text] * bool(m.text) + [f"<tool_call>\n{b}\n</tool_call>" for b in blocks])
        if role == "tool":
            cid = m.tool_call_id or ""
            if native:
                msg["tool_call_id"] = _mistral_id(cid) if fmt == "mistral" else cid
                if cid in names:
                    msg["name"] = names[cid]
            else:  # consecutive results share one user turn, as Qwen's template writes them
                block = f"<tool_response>\n{m.text}\n</tool_response>"
                if messages and messages[-1].get("tool_results"):
                    messages[-1]["content"] += "\n" + block
                    continue
                msg = {"role": "user", "content": block, "tool_results": True}
        messages.append(msg)
    for msg in messages:
        msg.pop("tool_results", None)
    variables: dict[str, Any] = {}
    if setup is not None:
        tools = [copy.deepcopy(t.model_dump(exclude_none=True)) for t in req.tools or []]
        if native:
            variables["tools"] = tools
        else:
            block = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{block}" if messages[0]["content"] else block
            else:
                messages.insert(0, {"role": "system", "content": block})
    return messages, variables
