"""The server driven as users drive it: the official ``openai`` client (sync and async, streaming and not)
against ``attnkit serve``'s app on a free loopback port, on a tiny random Llama with the default
model's tokenizer and chat template. Results are compared with the offline engine on the same weights."""

from __future__ import annotations

import asyncio
import os

import httpx
import openai
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, metric, running, tiny_app, wait_for  # noqa: E402

skip_module_without_default_model()

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def base(tokenizer):
    with running(tiny_app(tokenizer, max_num_seqs=8)) as url:
        yield url


@pytest.fixture(scope="module")
def offline(tokenizer):
    model = tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)
    return LLM.from_model(model, tokenizer, EngineConfig(), eos_ids=tokenizer.eos_ids)


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_models_and_health(base, client):
    assert [m.id for m in client.models.list().data] == [TINY]
    assert client.models.retrieve(TINY).id == TINY
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_offline_engine_with_logprobs(client, offline):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    got = client.completions.create(model=TINY, prompt=prompts, temperature=0, max_tokens=12, n=2, logprobs=3)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [ref[0].text] * 2 + [ref[1].text] * 2  # choice i*n + j
    assert got.id.startswith("cmpl-") and got.model == TINY and got.object == "text_completion"
    assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert got.usage.completion_tokens == 2 * sum(len(r.token_ids) for r in ref)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text and len(lp.top_logprobs) == len(ref[0].token_ids)
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(tlp)  # greedy: the sampled token is the top one
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    ids = client.completions.create(model=TINY, prompt=ref[0].prompt_token_ids, temperature=0, max_tokens=12)
    assert ids.choices[0].text == ref[0].text  # a token-id prompt


def test_streamed_completion_equals_the_whole_one(client):
    kw = dict(model=TINY, prompt="Once upon a time", temperature=0, max_tokens=20)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks[:-1])


def test_chat_through_the_template_sync_and_async(base, client, offline):
    ref = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=16))[0]
    got = client.chat.completions.create(model=TINY, messages=CHAT, temperature=0, max_completion_tokens=16)
    assert got.choices[0].message.content == ref.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids) and got.object == "chat.completion"
    assert got.choices[0].finish_reason == ref.finish_reason

    async def stream() -> tuple[str, list]:
        aclient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        s = await aclient.chat.completions.create(model=TINY, messages=CHAT, temperature=0, max_tokens=16,
                                                  stream=True, logprobs=True, top_logprobs=2)
        chunks = [c async for c in s]
        await aclient.close()
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks

    text, chunks = asyncio.run(stream())
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == ref.finish_reason
    lps = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(lps) == len(ref.token_ids) and all(len(e.top_logprobs) == 2 for e in lps)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in lps)


def test_sampling_fields_and_vllm_extras(client):
    kw = dict(model=TINY, prompt="Hello", max_tokens=8, temperature=0.9, top_p=0.9, seed=7, n=2)
    a = client.completions.create(**kw, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    b = client.completions.create(**kw, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    long = client.completions.create(model=TINY, prompt="Hello", max_tokens=6, temperature=0,
                                     extra_body={"min_tokens": 6, "ignore_eos": True})
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "length"


def test_logit_bias_forces_a_token(client, tokenizer):
    out = client.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, logit_bias={"42": 100},
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == tokenizer.decode([42] * 4)


def test_stop_strings_end_the_completion_and_are_not_shown(client):
    free = client.completions.create(model=TINY, prompt="Hello world", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    out = client.completions.create(model=TINY, prompt="Hello world", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == free[:free.find(stop)]


@pytest.mark.parametrize("kwargs, status, param, code", [
    (dict(model="gpt-4"), 404, "model", "model_not_found"),
    (dict(prompt="word " * 2000), 400, "prompt", "context_length_exceeded"),
    (dict(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    (dict(temperature=-1), 400, "temperature", None),
    (dict(top_p=0), 400, "top_p", None),
    (dict(n=0), 400, "n", None),
    (dict(logprobs=50), 400, "logprobs", None),
    (dict(extra_body={"bogus_field": 1}), 400, "bogus_field", None),
    (dict(extra_body={"min_tokens": 99}), 400, "min_tokens", None),
    (dict(extra_body={"stop_token_ids": [10**6]}), 400, "stop_token_ids", None),
    (dict(stream_options={"include_usage": True}), 400, "stream_options", None),
    (dict(suffix="!"), 400, "suffix", None),
    (dict(logit_bias={"abc": 1}), 400, "logit_bias", None),
])
def test_bad_requests_get_openai_shaped_errors(client, kwargs, status, param, code):
    args = dict(model=TINY, prompt="Hi", max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    err = e.value
    assert err.status_code == status and set(err.body) == {"message", "type", "param", "code"}
    assert err.body["param"] == param and err.body["code"] == code and err.body["message"]


def test_chat_errors_name_the_problem(client):
    with pytest.raises(openai.BadRequestError, match="tools"):  # a tool without a name
        client.chat.completions.create(model=TINY, messages=CHAT, tools=[{"type": "function", "function": {
            "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=TINY, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=TINY, messages=CHAT, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=TINY, messages=[])
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        client.post("/nowhere", body={}, cast_to=dict)


def test_disconnecting_mid_stream_aborts_and_frees_the_blocks(base):
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0
    aborted = metric(base, "attnkit_num_aborted_requests_total")
    body = {"model": TINY, "prompt": "Tell me a long story", "max_tokens": 900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(12)) if line.startswith("data:")) >= 5
        assert metric(base, "attnkit_kv_cache_blocks_used") > 0 and metric(base, "attnkit_num_requests_running") == 1
    # the response is closed: the engine aborts the request (not let it run to 900 tokens) and frees its blocks
    wait_for(lambda: metric(base, "attnkit_num_aborted_requests_total") == aborted + 1, what="the engine to abort")
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0 and metric(base, "attnkit_num_requests_running") == 0
    assert metric(base, "attnkit_request_finished_total", finish_reason="abort") >= 1
    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body | {"stream": False}, timeout=0.5)
    wait_for(lambda: metric(base, "attnkit_num_aborted_requests_total") == aborted + 2, what="the engine to abort")
    assert metric(base, "attnkit_kv_cache_blocks_used") == 0


def test_a_full_waiting_queue_is_a_503(tokenizer):
    with running(tiny_app(tokenizer, max_waiting=2)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=TINY, prompt="Hi", max_tokens=4, n=3)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        assert len(c.completions.create(model=TINY, prompt="Hi", max_tokens=4, n=2).choices) == 2


def test_api_key_is_required_on_v1_routes(tokenizer):
    with running(tiny_app(tokenizer, api_key="s3cret")) as url:
        for key in ("wrong", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
            assert e.value.body["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=TINY, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200


def test_metrics_count_what_happened(tokenizer):
    with running(tiny_app(tokenizer)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        outs = [c.completions.create(model=TINY, prompt="The same long prefix for the cache " * 4 + str(i),
                                     max_tokens=5, temperature=0, extra_body={"ignore_eos": True}) for i in range(3)]
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=TINY, prompt="Hi", temperature=-3)
        assert metric(url, "attnkit_http_requests_total", endpoint="/v1/completions", status="200") == 3
        assert metric(url, "attnkit_http_requests_total", endpoint="/v1/completions", status="400") == 1
        assert metric(url, "attnkit_prompt_tokens_total") == sum(o.usage.prompt_tokens for o in outs)
        assert metric(url, "attnkit_generation_tokens_total") == 15
        assert metric(url, "attnkit_request_finished_total", finish_reason="length") == 3
        for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
            assert metric(url, f"attnkit_{h}_seconds_count") == 3 and metric(url, f"attnkit_{h}_seconds_sum") > 0
        assert metric(url, "attnkit_prefix_cache_hits_total") > 0  # requests 2 and 3 reuse the first's blocks
        rate = metric(url, "attnkit_prefix_cache_hit_rate")
        assert rate == pytest.approx(metric(url, "attnkit_prefix_cache_hits_total")
                                     / metric(url, "attnkit_prefix_cache_queries_total"))
        assert metric(url, "attnkit_kv_cache_usage_ratio") == 0 and metric(url, "attnkit_kv_cache_blocks_total") > 0
        assert metric(url, "attnkit_num_requests_waiting") == 0


def test_echo_returns_the_prompt_and_its_logprobs(client, offline, base):
    """echo + logprobs (how evaluation harnesses score a text): the prompt's tokens and log-probabilities
    come first, equal to the engine's prompt_logprobs; streamed, the same text arrives."""
    prompt = "The capital of France is"
    ref = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=2))[0]
    got = client.completions.create(model=TINY, prompt=prompt, temperature=0, max_tokens=3, logprobs=2, echo=True)
    c = got.choices[0]
    assert c.text == prompt + ref.text
    lp = c.logprobs
    n_prompt = len(ref.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + len(ref.token_ids) and "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt):
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ref.prompt_token_ids[i]], abs=1e-5)
        assert len(lp.top_logprobs[i]) == 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert got.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.completions.create(model=TINY, prompt=[ref.prompt_token_ids], temperature=0, max_tokens=3,
                                            echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text


@pytest.mark.parametrize("extra", [{"kv_window": 64, "attention_sinks": 4}, {"kv_budget": 128}])
def test_a_kv_budget_takes_prompts_past_the_context(client, extra):
    """Attention sinks and SnapKV drop K/V: a prompt twice the 1024-token context is served, not refused."""
    out = client.completions.create(model=TINY, prompt="word " * 2000, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True, **extra})
    assert out.usage.prompt_tokens > 1024 and out.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="Hi", max_tokens=4, extra_body={next(iter(extra)): 0})
    assert e.value.body["param"] == next(iter(extra))
