"""Tool calling on /v1/chat/completions, driven by the official ``openai`` client against a tiny random Llama
with the default model's tokenizer (whose SmolLM2 template knows no tools: the fallback system block).
A random model calls nothing by itself, so forced choices ("required", a named function) carry the calls:
the grammar must make every one of them parse and validate against its schema, at temperature 1."""

from __future__ import annotations

import json
import os

import jsonschema
import openai
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.serve.protocol import ChatCompletionRequest  # noqa: E402
from attnkit.serve.tools import render_inputs, setup_tools  # noqa: E402
from attnkit.text.chat_template import render_chat  # noqa: E402
from engine_helpers import skip_module_without_default_model, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, running, tiny_app  # noqa: E402

skip_module_without_default_model()

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city", "unit", "days"],
    "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "Weather in Paris for 3 days, please."}]
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc123", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c", "days": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 C"}]

# a Hermes/Qwen-style template that renders tools itself (after Qwen2.5's, shortened)
HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for tc in message.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def client(tokenizer):
    with running(tiny_app(tokenizer, max_num_seqs=8)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(**({"model": TINY, "messages": ASK, "tools": TOOLS, "max_tokens": 120} | kw))


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_named_tool_choice_is_enforced_at_temperature_one(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    seen = set()
    for seed in range(20):
        c = chat(client, tool_choice=named, temperature=1.0, seed=seed).choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        [call] = c.message.tool_calls
        assert call.function.name == "get_weather"
        seen.add(json.dumps(check_call(call), sort_keys=True))
    assert len(seen) > 5  # sampled, not one fixed answer


def test_required_picks_among_the_tools(client):
    names = set()
    for seed in range(6):
        c = chat(client, tool_choice="required", parallel_tool_calls=False, seed=seed).choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0])
        names.add(c.message.tool_calls[0].function.name)
    assert names <= {"get_weather", "add"}
    c = chat(client, tool_choice="required", seed=0, max_tokens=300).choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) >= 1
    for call in c.message.tool_calls:
        check_call(call)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_streamed_tool_calls_reassemble_to_the_whole_answer(client, choice):
    whole = chat(client, tool_choice=choice, seed=7).choices[0]
    calls: dict[int, dict] = {}
    finish = []
    for chunk in chat(client, tool_choice=choice, seed=7, stream=True):
        for ch in chunk.choices:
            finish.append(ch.finish_reason)
            assert not ch.delta.content
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call names it, the rest carry arguments
                    assert d.id.startswith("call_") and d.type == "function" and d.function.arguments == ""
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert finish[-1] == whole.finish_reason == "tool_calls" and set(finish[:-1]) == {None}


def test_auto_with_a_model_that_calls_nothing_answers_content(client):
    c = chat(client, seed=3, max_tokens=12).choices[0]  # tool_choice defaults to "auto" with tools
    assert c.message.tool_calls is None and c.finish_reason == "length" and c.message.content


def test_history_renders_through_a_template_with_tools():
    req = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS})
    messages, variables = render_inputs(req, HERMES, setup_tools(req, HERMES))
    text = render_chat(HERMES, messages, **variables)
    assert json.dumps(TOOLS[1], ensure_ascii=False) in text  # tools as transformers passes them
    assert '"arguments": {"city": "Paris", "unit": "c", "days": 3}}' in text  # parsed, not a JSON string in a string
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text and messages[2]["name"] == "get_weather"
    none = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS, "tool_choice": "none"})
    assert "<tools>" not in render_chat(HERMES, *render_inputs(none, HERMES, setup_tools(none, HERMES))[:1])


def test_history_renders_through_the_default_template_by_the_fallback(tokenizer, client):
    tpl = tokenizer.chat_template
    req = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS})
    text = render_chat(tpl, *render_inputs(req, tpl, setup_tools(req, tpl))[:1])
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "add"' in text  # the tools block
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 3}}\n' \
           '</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    c = chat(client, messages=HISTORY, seed=1, max_tokens=8).choices[0]  # and the server takes that history
    assert c.finish_reason == "length"


@pytest.mark.parametrize("kwargs,param", [
    (dict(tools=[{"type": "function", "function": {"parameters": ADD}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=openai.NOT_GIVEN, tool_choice="required"), "tool_choice"),
    (dict(tool_choice="sometimes"), "tool_choice"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools.0.function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}],
          tool_choice="required"), "tools"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0"),
    (dict(messages=HISTORY[:1] + [dict(HISTORY[1], tool_calls=[{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{not json"}}])]), "messages.1.tool_calls.0.function.arguments"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),  # two grammars
])
def test_bad_tool_requests_are_400s_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kwargs)
    assert e.value.body["param"] == param, e.value.body
    assert chat(client, tool_choice="required", seed=0, max_tokens=60).choices[0].message.tool_calls  # still serving
