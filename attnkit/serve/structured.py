"""Structured outputs on the OpenAI server: the request fields that constrain the output, as one
:class:`~attnkit.engine.sampling_params.StructuredOutputs`, compiled before the request is queued.

The fields, at most one constraint per request (two are a 400 naming both):

- OpenAI's ``response_format`` (chat; completions too, as vLLM): ``{"type": "text"}`` (no constraint),
  ``{"type": "json_object"}`` (a JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict", "description"}}``. ``strict: true`` enforces the schema strictly (no property or array item the
  schema does not declare, unless it allows them explicitly); ``strict`` false or absent still holds the output
  to the schema, under JSON Schema's defaults (an object may carry undeclared properties).
- vLLM's older fields ``guided_json`` (a schema, or its JSON text), ``guided_regex``, ``guided_choice``,
  ``guided_grammar`` (GBNF, recognised by ``::=``, otherwise Lark), and its newer ``structured_outputs`` object
  (``json``, ``json_object``, ``regex``, ``choice``, ``grammar``, ``disable_any_whitespace``). Their schemas are
  strict, as vLLM's xgrammar backend makes them.

The grammar is compiled (xgrammar, :mod:`attnkit.engine.grammar`; cached per spec, so the engine's own compile
is a cache hit) in a worker thread before the request is queued: an invalid schema, regex or grammar is a 400
whose ``param`` names the request field, never a 500 or a stuck request.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..engine.sampling_params import SamplingParamsError, StructuredOutputs
from .errors import bad_request
from .protocol import _Sampling

if TYPE_CHECKING:
    from .state import ServerState

MAX_SCHEMA_DEPTH = 64  # nesting of a schema document: xgrammar's compile time grows fast with it (~6 s at 400)
COMPILE_TIMEOUT_S = 60.0  # a grammar that takes longer to compile is refused (the compile itself runs on)

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def constraint(req: _Sampling) -> tuple[StructuredOutputs, str] | None:
    """The request's output constraint and the field it came from (``param`` of its errors), or None; a 400
    naming the field for a malformed one or for more than one."""
    given: list[tuple[str, str, Any, bool]] = []  # (field, kind, value, strict)
    rf = getattr(req, "response_format", None)
    if rf is not None:
        if rf.type != "json_schema" and rf.json_schema is not None:
            raise bad_request(f"response_format.json_schema is only allowed with type json_schema, not {rf.type}",
                              "response_format.json_schema")
        if rf.type == "json_schema":
            if rf.json_schema is None:
                raise bad_request("response_format of type json_schema needs `json_schema` "
                                  "({\"name\", \"schema\", \"strict\"})", "response_format.json_schema")
            if rf.json_schema.schema_ is None:
                raise bad_request("`response_format.json_schema.schema` is required (the JSON schema of the output)",
                                  "response_format.json_schema.schema")
            given.append(("response_format", "json", rf.json_schema.schema_, bool(rf.json_schema.strict)))
        elif rf.type == "json_object":
            given.append(("response_format", "json_object", True, True))
    for name, kind in _GUIDED.items():
        if getattr(req, name) is not None:
            given.append((name, kind, getattr(req, name), True))
    so = req.structured_outputs
    if so is not None:
        for kind in _KINDS:
            value = getattr(so, "json_" if kind == "json" else kind)
            if value is not None and value is not False:
                given.append((f"structured_outputs.{kind}", kind, value, True))
    if len(given) > 1:
        names = [g[0] + (f" ({rf.type})" if g[0] == "response_format" and rf is not None else "") for g in given]
        raise bad_request(f"only one structured-output constraint per request; got {', '.join(names[:-1])} and "
                          f"{names[-1]}", given[1][0])
    if not given:
        if so is not None:
            raise bad_request("structured_outputs needs one of json, json_object, regex, choice, grammar (or a "
                              "response_format of type json_object or json_schema beside it)", "structured_outputs")
        return None
    param, kind, value, strict = given[0]
    try:
        spec = StructuredOutputs(**{kind: value}, strict=strict,
                                 disable_any_whitespace=so.disable_any_whitespace if so is not None else False)
    except SamplingParamsError as e:
        raise bad_request(f"{param}: {str(e).split(': ', 1)[-1]}", param) from None
    except RecursionError:  # JSON text of a schema nested thousands deep
        raise bad_request(f"{param}: the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep", param) from None
    if spec.json is not None and _depth(spec.json) > MAX_SCHEMA_DEPTH:
        raise bad_request(f"{param}: the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep", param)
    return spec, param


async def compile_checked(state: ServerState, spec: StructuredOutputs, param: str) -> None:
    """Compile ``spec`` (cached) off the event loop; an invalid spec is a 400 with ``param``."""
    # the first use loads xgrammar and builds the tokenizer's tables (seconds): off the event loop
    grammars = await asyncio.to_thread(lambda: state.engine.engine.grammars)
    try:
        await asyncio.wait_for(asyncio.to_thread(grammars.compile, spec), COMPILE_TIMEOUT_S)
    except SamplingParamsError as e:
        raise bad_request(f"{param}: {str(e).split(': ', 1)[-1]}", param) from None
    except asyncio.TimeoutError:
        raise bad_request(f"{param}: the constraint took over {COMPILE_TIMEOUT_S:.0f} s to compile; simplify it",
                          param) from None


async def checked_structured(state: ServerState, req: _Sampling) -> StructuredOutputs | None:
    """The request's constraint, compiled: what ``SamplingParams.structured`` gets."""
    found = constraint(req)
    if found is None:
        return None
    spec, param = found
    await compile_checked(state, spec, param)
    return spec
