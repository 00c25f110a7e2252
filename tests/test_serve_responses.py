"""POST /v1/responses (OpenAI's Responses API) driven by the official ``openai`` client — ``client.responses.create``,
streaming and not — against the app on a tiny random Llama with the default model's tokenizer and chat template.
A greedy response must equal the greedy chat completion of the same conversation (the Responses request is
translated into that chat request); errors name the Responses field."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.engine import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from attnkit.serve import build_app, responses  # noqa: E402
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, metric, running, tiny_engine, wait_for  # noqa: E402

skip_module_without_default_model()

INSTRUCTIONS = "You are terse."
QUESTION = "Name a colour."
CHAT = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
TINY_SHAPE = dict(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)  # serve_helpers.tiny_engine's


@pytest.fixture(scope="module")
def base(tokenizer):
    with running(build_app(tiny_engine(tokenizer, max_num_seqs=8), TINY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _chat(client, messages, max_tokens=16):
    return client.chat.completions.create(model=TINY, messages=messages, temperature=0,
                                          max_completion_tokens=max_tokens)


def test_text_with_instructions_equals_the_chat_completion(client):
    ref = _chat(client, CHAT)
    r = client.responses.create(model=TINY, instructions=INSTRUCTIONS, input=QUESTION, temperature=0,
                                max_output_tokens=16)
    assert r.output_text == ref.choices[0].message.content
    assert r.id.startswith("resp_") and r.object == "response" and r.model == TINY
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output[0].id.startswith("msg_") and r.output[0].content[0].type == "output_text"
    assert r.output[0].content[0].annotations == []
    assert r.instructions == INSTRUCTIONS and r.temperature == 0 and r.max_output_tokens == 16
    assert r.store is False and r.error is None and r.tools == [] and r.tool_choice == "auto"
    assert r.text.format.type == "text" and r.metadata == {}
    # usage counts the same tokens as the chat completion's
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.usage.output_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    done = ref.choices[0].finish_reason == "stop"
    assert r.status == ("completed" if done else "incomplete")


def test_list_of_items_equals_the_chat_completion(client):
    convo = [{"role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": "Name a fruit."},
             {"role": "assistant", "content": "Apple."},
             {"role": "user", "content": [{"type": "input_text", "text": "Another "},
                                          {"type": "input_text", "text": "one?"}]}]
    ref = _chat(client, [{**m, "content": m["content"] if isinstance(m["content"], str) else "Another one?"}
                         for m in convo])
    items = [convo[0], {"type": "message", **convo[1]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Apple.",
                                                                   "annotations": []}]},
             convo[3]]
    r = client.responses.create(model=TINY, input=items, temperature=0, max_output_tokens=16,
                                metadata={"k": "v"}, user="u1")
    assert r.output_text == ref.choices[0].message.content and r.metadata == {"k": "v"} and r.user == "u1"
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    # a response's output item sent back as input (what a multi-turn client does) is accepted
    again = client.responses.create(model=TINY, input=[*items, *r.output,
                                                       {"role": "user", "content": "Thanks."}],
                                    temperature=0, max_output_tokens=4)
    assert again.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model=TINY, input="Count to a hundred.", temperature=0, max_output_tokens=3,
                                extra_body={})
    ref = _chat(client, [{"role": "user", "content": "Count to a hundred."}], max_tokens=3)
    assert ref.choices[0].finish_reason == "length"  # the tiny random model does not stop within 3 tokens
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3
    assert r.output_text == ref.choices[0].message.content


def test_streaming_events_in_order_reassemble_the_text(client):
    kw = dict(model=TINY, instructions=INSTRUCTIONS, input=QUESTION, temperature=0, max_output_tokens=12)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    end = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert types[4:] == ["response.output_text.delta"] * len(deltas) + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len(deltas) >= 2 and "".join(d.delta for d in deltas) == whole.output_text
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == whole.output_text and final.output[0].id == item_id
    assert final.usage.model_dump() == whole.usage.model_dump() and final.status == whole.status
    assert events[-4].text == whole.output_text and events[-2].item.content[0].text == whole.output_text


def test_stream_helper_of_the_client_on_an_incomplete_response(client):
    """The client's own accumulator (``responses.stream``) takes the events; a cut response ends with
    ``response.incomplete``, as OpenAI's does."""
    with client.responses.stream(model=TINY, input=QUESTION, temperature=0, max_output_tokens=8) as s:
        events = list(s)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text
    assert text == client.responses.create(model=TINY, input=QUESTION, temperature=0, max_output_tokens=8).output_text


def test_a_response_that_stops_is_completed(tokenizer):
    """An engine whose end-of-sequence token is the reply's 4th greedy token: the reply stops after 3 tokens."""
    first = LLM.from_model(tiny_llama(tokenizer.vocab_size, **TINY_SHAPE), tokenizer, EngineConfig(),
                           eos_ids=tokenizer.eos_ids).chat(CHAT, SamplingParams(temperature=0, max_tokens=8))[0]
    eos = first.token_ids[3]
    assert eos not in first.token_ids[:3]
    engine = LLMEngine(tiny_llama(tokenizer.vocab_size, **TINY_SHAPE), tokenizer,
                       EngineConfig(kv_cache_bytes=16 << 20), [eos])
    with running(build_app(engine, TINY)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        kw = dict(model=TINY, instructions=INSTRUCTIONS, input=QUESTION, temperature=0, max_output_tokens=8)
        r = client.responses.create(**kw)
        chat = _chat(client, CHAT, max_tokens=8)
        with client.responses.stream(**kw) as s:
            text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
            final = s.get_final_response()  # needs the response.completed event
    assert r.status == final.status == "completed" and r.incomplete_details is None
    assert chat.choices[0].finish_reason == "stop" and r.output[0].status == "completed"
    assert r.usage.output_tokens == chat.usage.completion_tokens and r.usage.output_tokens in (3, 4)
    assert r.output_text == text == final.output_text == tokenizer.decode(first.token_ids[:3])


def _error(base: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(f"{base}/v1/responses", json=body, timeout=30)
    return r.status_code, r.json().get("error", {})


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi", "store": True}, "store", "store: false"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "does not store"),
    ({"input": "hi", "frequency_penalty": 0.5}, "frequency_penalty", "unknown field"),
    ({"input": [{"role": "user", "content": "hi", "colour": "red"}]}, "input.0.colour", "unknown field"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "input_image",
                                                                                "image_url": "x"}]}]},
     "input.1.content.0", "input_text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0", "an input item"),
    ({"input": ["hi"]}, "input.0", "an input item"),
    ({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, "tools.0.name", "pattern"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     "tools.0.parameters", "tools.0.parameters must be"),
    ({"input": []}, "input", "empty"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens", "context length"),
    ({"input": "hi", "temperature": -1.0}, "temperature", "temperature"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "name` and `schema"),
    ({"input": "hi", "model": "gpt-4o"}, "model", "does not exist"),
])
def test_errors_name_the_responses_field(base, body, param, words):
    status, err = _error(base, body)
    assert status == (404 if param == "model" else 400), err
    assert err["param"] == param and words in err["message"], err


def test_errors_from_the_chat_checks_name_the_item(base):
    """The conversation is checked as chat messages; a problem there names the Responses item."""
    long = "word " * 5000
    status, err = _error(base, {"instructions": "x", "input": [{"role": "user", "content": "hi"},
                                                               {"role": "user", "content": long * 20}]})
    assert status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "input", err


def test_errors_in_function_call_items_name_the_item(base):
    """Calls are checked as the tool_calls of one assistant message; the error names the item of the call."""
    user = {"role": "user", "content": "hi"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    status, err = _error(base, {"instructions": "x", "input": [user, {**call, "name": "bad name"}]})
    assert status == 400 and err["param"] == "input.1.name" and "`input.1.name`" in err["message"], err
    status, err = _error(base, {"instructions": "x", "input": [user, call, {**call, "call_id": "c2",
                                                                            "arguments": "not json"}]})
    assert status == 400 and err["param"] == "input.2.arguments" and "messages" not in err["message"], err


def test_client_error_types(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=TINY, input="hi", store=True)
    assert e.value.body["param"] == "store"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=TINY, input="hi", extra_body={"seed": 1})
    assert e.value.body["param"] == "seed"


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}


def test_text_format_is_chat_response_format(base, client):
    schema = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    chat_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    r = client.responses.create(model=TINY, input="Weather in Paris, as JSON.", text={"format": schema},
                                temperature=0, max_output_tokens=120)
    ref = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Weather in Paris, as JSON."}],
                                         response_format=chat_format, temperature=0, max_tokens=120)
    assert r.status == "completed" and r.output_text == ref.choices[0].message.content
    assert set(json.loads(r.output_text)) == {"city", "unit"}
    assert r.text.format.type == "json_schema" and r.text.format.name == "weather"
    obj = client.responses.create(model=TINY, input="A JSON object.", text={"format": {"type": "json_object"}},
                                  temperature=0, max_output_tokens=16)
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)
    else:
        assert obj.output_text.lstrip().startswith("{")
    status, err = _error(base, {"input": "hi", "text": {"format": {"type": "json_schema", "name": "bad name",
                                                                   "schema": WEATHER}}})
    assert status == 400 and err["param"] == "text.format.name", err


def test_function_tools(base, client):
    kw = dict(model=TINY, input="Weather in Paris?", tools=[TOOL], temperature=0, max_output_tokens=120,
              tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(**kw)
    ref = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=[CHAT_TOOL], temperature=0, max_tokens=120,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert call.status == "completed" and set(json.loads(call.arguments)) == {"city", "unit"}
    assert call.arguments == ref.choices[0].message.tool_calls[0].function.arguments  # the same greedy call
    assert r.output_text == "" and r.usage.output_tokens == ref.usage.completion_tokens
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # streamed: the call's item, its argument deltas, then the same response
    events = list(client.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n >= 1 and types == ["response.created", "response.in_progress", "response.output_item.added"] + [
        "response.function_call_arguments.delta"] * n + ["response.function_call_arguments.done",
                                                         "response.output_item.done", "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert events[-1].response.output[0].arguments == call.arguments and events[2].item.name == "get_weather"
    # the round trip: the call and its output sent back as input items, after the call as the client got it
    back = client.responses.create(model=TINY, tools=[TOOL], temperature=0, max_output_tokens=8, input=[
        {"role": "user", "content": "Weather in Paris?"}, call,
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}])
    chat_back = client.chat.completions.create(model=TINY, tools=[CHAT_TOOL], temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'}])
    assert back.usage.input_tokens == chat_back.usage.prompt_tokens
    assert back.output_text == (chat_back.choices[0].message.content or "")


def test_output_items_from_parser_events():
    """Content, two calls and content again (what a Hermes-format reply can hold): four items in order, each
    announced, filled and closed by its events; only the last item takes the final status."""
    ev = responses._Events()
    out = responses._Output(ev)
    for e in [("content", "Let me "), ("content", "check."), ("call", 0, "a"), ("args", 0, '{"x":'),
              ("args", 0, " 1}"), ("call", 1, "b"), ("args", 1, "{}"), ("content", "Done")]:
        out.apply(e)
    items = out.finish("incomplete")
    events = [json.loads(line.split("data: ", 1)[1]) for line in out.take()]
    assert [(i["type"], i["status"]) for i in items] == [("message", "completed"), ("function_call", "completed"),
                                                         ("function_call", "completed"), ("message", "incomplete")]
    assert items[0]["content"][0]["text"] == "Let me check." and items[3]["content"][0]["text"] == "Done"
    assert [i.get("arguments") for i in items[1:3]] == ['{"x": 1}', "{}"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e["output_index"]) for e in events] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0), ("response.output_text.delta", 0),
        ("response.output_text.delta", 0), ("response.output_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1), ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.output_item.added", 3), ("response.content_part.added", 3), ("response.output_text.delta", 3),
        ("response.output_text.done", 3), ("response.content_part.done", 3), ("response.output_item.done", 3)]
    assert events[10]["arguments"] == '{"x": 1}' and events[11]["item"]["arguments"] == '{"x": 1}'
    empty = responses._Output()
    assert [i["content"] for i in empty.finish("completed")] == [[responses._text_part("")]]  # no item: a message


def test_metrics_count_the_endpoint(base, client):
    before = metric(base, "attnkit_http_requests_total", endpoint="/v1/responses", status="200")
    client.responses.create(model=TINY, input="hi", max_output_tokens=2)
    assert metric(base, "attnkit_http_requests_total", endpoint="/v1/responses", status="200") == before + 1


def test_disconnecting_aborts_the_engine_request(base):
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0
    aborted = metric(base, "attnkit_num_aborted_requests_total")
    body = {"model": TINY, "input": "Tell me a long story", "max_output_tokens": 900, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if "response.output_text.delta" in line)
    # the response is closed: the engine aborts the request (not let it run to 900 tokens) and frees its blocks
    wait_for(lambda: metric(base, "attnkit_num_aborted_requests_total") == aborted + 1, what="the engine to abort")
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request whose client gives up
        httpx.post(f"{base}/v1/responses", json=body | {"stream": False}, timeout=0.5)
    wait_for(lambda: metric(base, "attnkit_num_aborted_requests_total") == aborted + 2, what="the engine to abort")
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0
