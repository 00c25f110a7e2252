"""The server's LoRA adapters: ``"model": "base:adapter"`` (or the adapter's own name) picks one per request,
concurrent requests for different adapters are answered together, and each answer equals the merged model's."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: F401
from serve_helpers import TINY, running

from attnkit.cli import main
from attnkit.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from attnkit.peft import LoraConfig, PeftModel, get_peft_model
from attnkit.serve import build_app

skip_module_without_default_model()

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def _base(tokenizer):
    return tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    """(server url, {adapter: offline LLM on the merged model}, offline LLM on the base)."""
    merged = {}
    for k, (name, targets) in enumerate({"poet": ["q_proj", "v_proj"], "coder": ["o_proj", "down_proj"]}.items()):
        peft = get_peft_model(_base(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in peft.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g))
        directory = tmp_path_factory.mktemp(name)
        peft.save_pretrained(directory)
        model = PeftModel.from_pretrained(_base(tokenizer), directory).merge_and_unload()
        merged[name] = (directory, LLM.from_model(model, tokenizer, EngineConfig(), eos_ids=tokenizer.eos_ids))
    engine = LLMEngine(_base(tokenizer), tokenizer, EngineConfig(kv_cache_bytes=16 << 20), tokenizer.eos_ids)
    for name, (directory, _) in merged.items():
        engine.add_lora(name, directory)
    base_llm = LLM.from_model(_base(tokenizer), tokenizer, EngineConfig(), eos_ids=tokenizer.eos_ids)
    with running(build_app(engine, TINY)) as url:
        yield url, {n: llm for n, (_, llm) in merged.items()}, base_llm


def _texts(llm: LLM) -> list[str]:
    return [o.text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))]


def test_models_lists_the_adapters(setup):
    url, _, _ = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    cards = client.models.list().data
    assert [m.id for m in cards] == [TINY, f"{TINY}:poet", f"{TINY}:coder"]
    assert cards[1].model_extra["parent"] == TINY


def test_concurrent_requests_for_each_adapter_equal_the_merged_models(setup):
    url, merged, base_llm = setup
    want = {TINY: _texts(base_llm), f"{TINY}:poet": _texts(merged["poet"]), "coder": _texts(merged["coder"])}
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters change the answers

    async def ask(client, model, prompt):
        r = await client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12)
        assert r.model == model
        return r.choices[0].text

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        jobs = [(m, i) for m in want for i in range(len(PROMPTS))]
        texts = await asyncio.gather(*(ask(client, m, PROMPTS[i]) for m, i in jobs))
        return dict(zip(jobs, texts))

    got = asyncio.run(main())
    for (model, i), text in got.items():
        assert text == want[model][i], model


def test_chat_with_an_adapter_and_unknown_adapters(setup):
    url, merged, _ = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Name a colour."}]
    ref = merged["poet"].chat(msgs, SamplingParams(temperature=0, max_tokens=10))[0].text
    got = client.chat.completions.create(model=f"{TINY}:poet", messages=msgs, temperature=0, max_tokens=10)
    assert got.choices[0].message.content == ref
    for bad in (f"{TINY}:nope", "nope", "other:poet"):
        with pytest.raises(openai.NotFoundError, match=f"{TINY}:poet"):
            client.completions.create(model=bad, prompt="hi", max_tokens=2)


def test_serve_cli_refuses_a_malformed_lora_flag(capsys):
    assert main(["serve", "--lora", "no-equals-sign"]) != 0
    assert "expected NAME=DIR" in capsys.readouterr().err
