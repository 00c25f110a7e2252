"""Hostile bodies (hypothesis): wrong types, huge and negative numbers, unknown fields, invalid UTF-8,
megabyte strings, deeply nested JSON. Every one is built to be invalid, and every answer must be a
4xx with an OpenAI-shaped error — never a 5xx — and the server must stay healthy afterwards."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest  # noqa: E402
from engine_helpers import skip_module_without_default_model, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, running, tiny_app  # noqa: E402

skip_module_without_default_model()

ENDPOINTS = {
    "/v1/completions": {"model": TINY, "prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}

HUGE = st.sampled_from([10**30, -(10**30), 2**63, -(2**63) - 1, 1e308, -1e308, 1e400, -1e400])
INFINITE = st.sampled_from([1e400, -1e400, -1e308])  # 1e400 is parsed as inf
NOT_A_NUMBER = st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
NOT_AN_INT = st.one_of(NOT_A_NUMBER.filter(lambda v: v is not None), st.floats(allow_nan=False, allow_infinity=False))
# per field: values that must be refused (out of range, wrong type, huge)
BAD = {
    "temperature": st.one_of(NOT_A_NUMBER.filter(lambda v: v is not None), st.floats(max_value=-1e-6),
                             INFINITE),
    "top_p": st.one_of(NOT_A_NUMBER.filter(lambda v: v is not None), st.floats(max_value=0), st.floats(min_value=1.0001),
                       HUGE),
    "min_p": st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.0001), HUGE),
    "presence_penalty": st.one_of(st.floats(min_value=2.0001), st.floats(max_value=-2.0001), HUGE),
    "frequency_penalty": st.one_of(st.floats(min_value=2.0001), st.floats(max_value=-2.0001),
                                   NOT_A_NUMBER.filter(lambda v: v is not None)),
    "repetition_penalty": st.one_of(st.floats(max_value=0), INFINITE),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=129), NOT_AN_INT, HUGE),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=2000), NOT_AN_INT, HUGE),
    "seed": st.one_of(NOT_AN_INT, st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)),
    "top_k": st.one_of(st.integers(max_value=-2), NOT_AN_INT),
    "min_tokens": st.one_of(st.integers(max_value=-1), st.integers(min_value=3), NOT_AN_INT),
    "stop": st.one_of(st.integers(), st.just(""), st.lists(st.text(max_size=3), min_size=17, max_size=20),
                      st.lists(st.integers(), min_size=1, max_size=3)),
    "logit_bias": st.one_of(st.just({"-1": 1}), st.just({"1": 101}), st.just({"x": 1}), st.just({"9" * 5000: 1}),
                            st.just({"²": 1}), st.just({"999999999": 1}), st.lists(st.integers(), max_size=2)),
    "stop_token_ids": st.one_of(st.just([-1]), st.just([10**9]), st.just("1"), st.just([1.5])),
    "stream": st.one_of(st.integers(), st.text(max_size=3)),
    "ignore_eos": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "stream_options": st.one_of(st.just({"include_usage": True}), st.just({"bogus": 1}), st.integers()),
    "model": st.one_of(st.just("x" * (1 << 20)), st.text(min_size=1, max_size=20).filter(lambda s: s != TINY),
                       st.integers(), st.lists(st.text(max_size=3), max_size=2)),
    "user": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2)),
}
BAD_PROMPT = st.one_of(st.just("a" * (1 << 20)), st.just(""), st.just([]), st.just([[]]), st.integers(),
                       st.just([-1]), st.just([10**9]), st.just([[1, 2], "x"]), st.just([1.5]), st.none())
BAD_MESSAGES = st.one_of(
    st.just([]), st.just("hi"), st.just([{"role": "user"}]), st.just([{"role": "tool", "content": "x"}]),
    st.just([{"role": "user", "content": "x" * (1 << 20)}]), st.just([{"role": "user", "content": 5}]),
    st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    st.just([{"role": "user", "content": "x", "name": "bob"}]), st.just([None]), st.just([["user", "x"]]))
KNOWN = {f for m in (CompletionRequest, ChatCompletionRequest, EmbeddingRequest) for f in m.model_fields}
FIELDS = st.text(min_size=1, max_size=30).filter(lambda k: k not in KNOWN)


@st.composite
def hostile(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(ENDPOINTS) + ["/v1/embeddings"]))
    base = dict(ENDPOINTS.get(path, {"input": "hi"}))
    kind = draw(st.sampled_from(["field", "unknown", "prompt", "utf8", "nested", "raw", "not_object", "huge_key"]))
    if path == "/v1/embeddings" and kind in ("field", "prompt"):
        base["input"] = draw(st.one_of(st.just(""), st.just([]), st.integers(), st.just([1, 2]),
                                       st.lists(st.just("x"), min_size=2049, max_size=2049)))
    elif kind == "field":
        name = draw(st.sampled_from(sorted(BAD)))
        base[name] = draw(BAD[name])
    elif kind == "unknown":
        base[draw(FIELDS)] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    elif kind == "prompt":
        if "prompt" in base:
            base["prompt"] = draw(BAD_PROMPT)
        else:
            base["messages"] = draw(BAD_MESSAGES)
    elif kind == "huge_key":
        base["k" * (1 << 20)] = 1
    body = json.dumps(base).encode()
    if kind == "utf8":  # invalid UTF-8 inside a string
        body = body.replace(b'"Hi"', b'"H\xff\xfei"').replace(b'"hi"', b'"h\xc3\x28i"')
        if body == json.dumps(base).encode():
            body = b'{"\xff": 1}'
    elif kind == "nested":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        field = draw(st.sampled_from(["prompt", "stop", "logit_bias", "messages", "input", "zzz"]))
        inner = "[" * depth + "]" * depth if field != "logit_bias" else '{"a":' * depth + "1" + "}" * depth
        body = body[:-1] + f', "{field}": {inner}}}'.encode()
    elif kind == "raw":
        body = draw(st.binary(max_size=64))
    elif kind == "not_object":
        body = json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5),
                                         st.none()))).encode()
    return path, body


@pytest.fixture(scope="module")
def base(tokenizer):
    with running(tiny_app(tokenizer)) as url:
        yield url


def _assert_openai_error(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=hostile())
def test_hostile_bodies_get_4xx_openai_errors(base, case):
    path, body = case
    r = httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    _assert_openai_error(r)


@pytest.mark.parametrize("body", [b'{"prompt": NaN}', b'{"prompt": "x", "temperature": Infinity}',
                                  b"[" * 200_000, b'{"prompt": "' + b"a" * (9 << 20) + b'"}', b"\xff\xfe\x00"])
def test_pathological_bodies(base, body):
    _assert_openai_error(httpx.post(f"{base}/v1/completions", content=body, timeout=60))


def test_wrong_methods_and_routes_are_openai_errors(base):
    for r in (httpx.get(f"{base}/v1/completions"), httpx.post(f"{base}/nope", json={}),
              httpx.delete(f"{base}/v1/models"), httpx.post(f"{base}/v1/completions", content=b"x",
                                                             headers={"content-type": "text/plain"})):
        _assert_openai_error(r)


def test_healthy_after_the_fuzzing(base):
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    r = httpx.post(f"{base}/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    text = httpx.get(f"{base}/metrics").text
    assert 'status="5' not in text  # no 5xx was ever answered
