"""The server on the embedded models, driven by the openai client: 64 concurrent streaming chats whose
greedy replies equal offline ``LLM.chat``, embeddings equal to sentence-transformers', and SIGTERM
draining an in-flight stream in a real ``attnkit serve`` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.engine import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from attnkit.loading import defaults, load_causal_lm, load_sentence_encoder  # noqa: E402
from attnkit.serve import build_app  # noqa: E402
from engine_helpers import skip_module_without_default_model  # noqa: E402
from serve_helpers import metric, running, wait_for  # noqa: E402

skip_module_without_default_model()

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello in Spanish.",
             "What do bees make?", "Name a planet.", "What colour is the sky?", "Give me a synonym for happy.",
             "What is the opposite of cold?", "Name a fruit.", "How many legs does a spider have?",
             "What language is spoken in Brazil?", "Name an ocean.", "What is H2O?", "Who wrote Hamlet?",
             "What is the largest mammal?"]
NAME, EMB = "smol", "minilm"


@pytest.fixture(scope="module")
def served():
    lm = load_causal_lm(None)
    offline = LLM.from_model(lm.model, lm.tokenizer, EngineConfig(kv_cache_bytes=256 << 20), eos_ids=lm.stop_ids)
    engine = LLMEngine(lm.model, lm.tokenizer, EngineConfig(kv_cache_bytes=256 << 20, max_num_seqs=64), lm.stop_ids)
    app = build_app(engine, NAME, embedder=load_sentence_encoder(None), embedding_name=EMB)
    with running(app) as url:
        yield url, offline


def test_64_concurrent_streaming_chats_complete_and_greedy_ones_equal_offline(served):
    base, offline = served
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ref = [o.text for o in offline.chat(convs, SamplingParams(temperature=0, max_tokens=8))]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, str | None, int]:
        greedy = i < 48
        stream = await client.chat.completions.create(
            model=NAME, messages=convs[i % 16], max_tokens=8, stream=True, stream_options={"include_usage": True},
            **({"temperature": 0} if greedy else {"temperature": 0.8, "seed": i}))
        text, finish, usage = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage.completion_tokens
        return i, text, finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(f in ("stop", "length") and 1 <= u <= 8 for _, _, f, u in results)
    assert [text for i, text, _, _ in results if i < 48] == [ref[i % 16] for i in range(48)]
    assert ref[0].strip().startswith("The capital of France is Paris") or "Paris" in ref[0]
    wait_for(lambda: metric(base, "attnkit_kv_cache_blocks_used") == 0, what="all blocks to be free")
    assert metric(base, "attnkit_http_requests_total", endpoint="/v1/chat/completions", status="200") == 64


def test_embeddings_equal_sentence_transformers(served):
    st = pytest.importorskip("sentence_transformers")
    base, _ = served
    texts = ["A cat sits on the mat.", "Ein Hund läuft im Park.", "The stock market fell today."]
    ref = st.SentenceTransformer(str(defaults.default_embedding_model()), device="cpu").encode(texts)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    got = client.embeddings.create(model=EMB, input=texts)  # the client asks for base64 and decodes it
    as_floats = client.embeddings.create(model=EMB, input=texts, encoding_format="float")
    for out in (got, as_floats):
        assert [d.index for d in out.data] == [0, 1, 2] and out.model == EMB and out.usage.prompt_tokens > 0
        np.testing.assert_allclose(np.array([d.embedding for d in out.data]), ref, atol=2e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=EMB, input="x", dimensions=12)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=NAME, input="x")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=EMB, prompt="x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_accepting_drains_the_stream_then_exits():
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "attnkit.cli", "serve", "--port", str(port), "--no-embeddings",
                             "--kv-cache-mb", "64", "--log-level", "warning", "--api-key", "k3y"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120, what="attnkit serve to start")
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi"})  # --api-key: no key, no service
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        first, chunks = threading.Event(), []

        def consume() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer k3y"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        chunks.append(line[5:].strip())
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # the listening socket is closed
            httpx.get(f"{base}/health", timeout=2)
        reader.join(120)
        assert proc.wait(60) == 0
        assert chunks[-1] == "[DONE]"
        usage = json.loads(chunks[-2])["usage"]
        finals = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-2]]
        assert usage["completion_tokens"] == 40 and finals[-1] == "length"  # the in-flight request finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
