"""Structured outputs through the server, driven by the official ``openai`` client: ``response_format``
(json_schema, json_object) on chat, vLLM's ``guided_*`` and ``structured_outputs`` on completions and chat. At
temperature 1 on a tiny random Llama every sample must hold (the mask is the only thing that keeps a random model
in the language); bad constraints are 400s naming the request field, before anything is queued."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.engine import StructuredOutputs  # noqa: E402
from attnkit.engine.grammar import MAX_JSON_WHITESPACE  # noqa: E402
from attnkit.serve import build_app  # noqa: E402
from attnkit.serve.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from attnkit.serve.structured import constraint  # noqa: E402
from engine_helpers import skip_module_without_default_model, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, running, tiny_engine  # noqa: E402

skip_module_without_default_model()

# every string and number bounded: with whitespace bounded too (MAX_JSON_WHITESPACE per gap, 9 gaps) the longest
# valid text is under 300 bytes, so max_tokens=600 lets every random sample finish (two properties keep 96 samples
# short: ~30 tokens each)
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def engine(tokenizer):  # noqa: F811
    return tiny_engine(tokenizer, max_num_seqs=256)


@pytest.fixture(scope="module")
def base(engine):
    with running(build_app(engine, TINY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def _max_ws_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"\s+", text)), default=0)


def test_json_schema_holds_on_96_samples_at_temperature_one(client):
    def ask(i: int):
        return client.chat.completions.create(model=TINY, messages=ASK, response_format=PERSON_FORMAT, n=8,
                                              temperature=1.0, max_tokens=600, seed=i)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(ask, range(12)))
    choices = [c for r in replies for c in r.choices]
    assert len(choices) == 96
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
        assert _max_ws_run(c.message.content) <= MAX_JSON_WHITESPACE
    assert len({c.message.content for c in choices}) > 72  # sampled, not one answer repeated


def test_streamed_json_schema_reassembles(client):
    chunks = list(client.chat.completions.create(model=TINY, messages=ASK, response_format=PERSON_FORMAT, n=2,
                                                 temperature=1.0, max_tokens=600, seed=3, stream=True))
    for i in range(2):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        text = "".join(p.delta.content or "" for p in parts)
        assert parts[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)


def test_regex_on_100_completions(client):
    pattern = r"[0-9]{3}-[a-z]{2,4}( [A-Z][a-z]?)?"
    r = client.completions.create(model=TINY, prompt="A code:", n=100, temperature=1.0, max_tokens=40,
                                  extra_body={"guided_regex": pattern})
    assert len(r.choices) == 100
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    assert len({c.text for c in r.choices}) > 50


def test_choice_on_100_chat_samples(client):
    options = ["red", "green", "blue", "a \"quoted\" colour", "ünïcödé"]
    r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "A colour?"}], n=100,
                                       temperature=1.0, max_tokens=20, extra_body={"guided_choice": options})
    assert len(r.choices) == 100
    assert all(c.message.content in options and c.finish_reason == "stop" for c in r.choices)
    assert len({c.message.content for c in r.choices}) >= 3
    r = client.completions.create(model=TINY, prompt="Yes or no?", n=20, temperature=1.0, max_tokens=8,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in r.choices} == {"yes", "no"}


def test_json_object(client):
    r = client.chat.completions.create(model=TINY, messages=ASK, response_format={"type": "json_object"}, n=16,
                                       temperature=1.0, max_tokens=60, seed=5)
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 3  # any object: a random model may write one string until max_tokens
    assert all(isinstance(json.loads(t), dict) for t in done)
    assert all(c.message.content.lstrip().startswith("{") for c in r.choices)
    assert any('"' in c.message.content for c in r.choices)  # not only {}: the grammar leaves room for keys


def test_json_on_completions_and_whitespace(client):
    """guided_json (JSON text) and structured_outputs.json on /v1/completions; disable_any_whitespace is compact."""
    kw = dict(model=TINY, prompt="JSON:", n=16, temperature=1.0, max_tokens=600, seed=11)
    free = client.completions.create(**kw, extra_body={"guided_json": json.dumps(PERSON)})
    compact = client.completions.create(**kw, extra_body={"structured_outputs": {
        "json": PERSON, "disable_any_whitespace": True}})
    for c in free.choices + compact.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)
    assert any("\n" in c.text for c in free.choices)  # the random model takes the free whitespace it is given
    assert not any(re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.text)) for c in compact.choices)
    # disable_any_whitespace beside response_format, as vLLM merges them
    r = client.chat.completions.create(model=TINY, messages=ASK, response_format=PERSON_FORMAT, n=8, seed=2,
                                       temperature=1.0, max_tokens=600,
                                       extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    assert not any(re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.message.content)) for c in r.choices)


@pytest.mark.parametrize("grammar, pattern", [
    ('root ::= "a" [0-9]{1,4} ("b" | "cd")', r"a[0-9]{1,4}(b|cd)"),  # GBNF
    ('start: "x" NUM ("-" WORD)?\nNUM: /[0-9]{2}/\nWORD: /[a-z]{1,3}/', r"x[0-9]{2}(-[a-z]{1,3})?"),  # Lark
])
def test_grammars(client, grammar, pattern):
    r = client.completions.create(model=TINY, prompt="Go:", n=30, temperature=1.0, max_tokens=30,
                                  extra_body={"guided_grammar": grammar})
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in r.choices), \
        [c.text for c in r.choices]
    r = client.chat.completions.create(model=TINY, messages=ASK, n=10, temperature=1.0, max_tokens=30,
                                       extra_body={"structured_outputs": {"grammar": grammar}})
    assert all(re.fullmatch(pattern, c.message.content) for c in r.choices)


def test_strict_decides_undeclared_properties(engine):
    """response_format's strict reaches the grammar: strict refuses a property the schema does not declare,
    non-strict (false or absent) takes it, as JSON Schema's default additionalProperties does."""
    open_schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    def spec(strict):
        js = {"name": "x", "schema": open_schema} | ({} if strict is None else {"strict": strict})
        req = ChatCompletionRequest.model_validate({"messages": ASK, "response_format": {
            "type": "json_schema", "json_schema": js}})
        found = constraint(req)
        assert found is not None and found[1] == "response_format"
        return found[0]

    def takes(s: StructuredOutputs, text: str) -> bool:
        m = engine.grammars.matcher(engine.grammars.compile(s))
        return m.accept_string(text)

    assert spec(True).strict and not spec(False).strict and not spec(None).strict
    assert takes(spec(True), '{"a": 1}') and not takes(spec(True), '{"a": 1, "b": 2}')
    assert takes(spec(False), '{"a": 1, "b": 2}') and takes(spec(None), '{"a": 1, "b": [true]}')
    # vLLM's fields are strict, as its xgrammar backend compiles them
    req = CompletionRequest.model_validate({"prompt": "x", "guided_json": open_schema})
    assert constraint(req)[0].strict


DEEP = {"type": "integer"}
for _ in range(80):
    DEEP = {"type": "array", "items": DEEP}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "foo"}}}},
     "response_format", ["invalid JSON schema", "foo"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}}, "response_format", ["minLength"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
     "response_format.json_schema.name", ["required"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a person", "schema": PERSON}}},
     "response_format.json_schema.name", ["pattern"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
     "response_format.json_schema.schema", ["required"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["json_schema"]),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "p", "schema": PERSON}}},
     "response_format.json_schema", ["only allowed"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", []),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": DEEP}}},
     "response_format", ["levels deep"]),
    ({"guided_json": "[" * 100_000 + "]" * 100_000}, "guided_json", ["levels deep"]),
    ({"guided_regex": "([0-9]"}, "guided_regex", ["invalid regex", "parenthesis"]),
    ({"guided_regex": ""}, "guided_regex", ["non-empty"]),
    ({"guided_grammar": 'root ::= "a" foo'}, "guided_grammar", ["invalid grammar", "foo"]),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", ["invalid grammar"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty"]),
    ({"response_format": {"type": "json_object"}, "guided_regex": "[a-z]+"}, "guided_regex",
     ["only one", "response_format (json_object)", "guided_regex"]),
    ({"guided_json": PERSON, "guided_choice": ["a"]}, "guided_choice", ["guided_json", "guided_choice"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice",
     ["structured_outputs.regex", "structured_outputs.choice"]),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs", ["needs one of"]),
    ({"structured_outputs": {"json": PERSON, "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
     ["unknown field"]),
    ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", ["unknown field"]),
])
def test_bad_constraints_are_400s_naming_the_field(base, client, body, param, words):
    chat = httpx.post(f"{base}/v1/chat/completions", json={"model": TINY, "messages": ASK, "max_tokens": 4} | body,
                      timeout=60)
    assert chat.status_code == 400, chat.text
    err = chat.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert all(w in err["message"] for w in words), err["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the same on /v1/completions
        client.completions.create(model=TINY, prompt="Hi", max_tokens=4, extra_body=body)
    assert e.value.body["param"] == param and e.value.body["message"] == err["message"]
    # and the server still serves, constrained or not
    ok = client.completions.create(model=TINY, prompt="Hi", max_tokens=4, temperature=1.0,
                                   extra_body={"guided_regex": "[ab]{4}"})
    assert re.fullmatch("[ab]{4}", ok.choices[0].text)


def test_bounded_strings_are_json_strings(engine):
    """A string with maxLength/minLength takes JSON's characters: no raw control character (xgrammar's own grammar
    lets them through: mlc-ai/xgrammar#800), escapes count as one character, no surrogate code point."""
    m = engine.grammars.compile(StructuredOutputs(json={"type": "string", "minLength": 1, "maxLength": 3}))

    def takes(text: str) -> bool:
        matcher = engine.grammars.matcher(m)
        return matcher.accept_string(text) and matcher.accept_token(next(iter(engine.eos_ids)))

    assert takes('"abc"') and takes('"a\\tb"') and takes('"\\u00e9\\"\\\\"')
    assert not takes('"a\tb"') and not takes('"\x0b"') and not takes('"abcd"') and not takes('""')
    # nor a UTF-16 surrogate as three bytes (ED AD A1 is U+DB61: not UTF-8; the byte tokens of the GPT-2 alphabet)
    matcher = engine.grammars.matcher(m)
    assert matcher.accept_string('"') and matcher.accept_token(engine.tokenizer.tk.token_to_id("í"))
    assert not matcher.accept_token(engine.tokenizer.tk.token_to_id("Ń"))
