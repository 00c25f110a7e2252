"""The engine with a real tokenizer (stop strings, text prompts, chat) and on the embedded SmolLM2."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import attnkit.loading as loading  # noqa: E402
import attnkit.loading.defaults  # noqa: E402,F401
from attnkit import LLM, SamplingParams  # noqa: E402
from attnkit.decoding.generate import SamplingParams as SimpleParams  # noqa: E402
from attnkit.decoding.generate import generate  # noqa: E402
from engine_helpers import make_llm, skip_module_without_default_model, tiny_llama, tokenizer  # noqa: E402,F401

skip_module_without_default_model()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_llm(tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64), tokenizer,
                    eos_ids=tokenizer.eos_ids)


def test_stop_strings_across_token_boundaries_are_never_shown(tiny, tokenizer):
    free = tiny.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    text = free.text
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and "".join(pieces) == text)
    stop = pieces[i][-1] + pieces[i + 1][:1]
    out = tiny.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "@@@@"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[:text.find(stop)] and stop not in out.text
    for o in tiny.stream("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])):
        assert out.text.startswith(o.text)  # never a piece of the stop string, even while streaming
    length = tiny.generate("Hello world", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 5


@pytest.fixture(scope="module")
def smol():
    return LLM(quantize=None)  # float32 weights: exactly the single-stream decoder's numbers


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def test_engine_greedy_equals_single_stream_on_the_default_model(smol):
    lm = loading.load_causal_lm()
    ref = []
    for p in PROMPTS:
        ids = [t for t in generate(lm.model, lm.tokenizer.encode(p), SimpleParams(max_new_tokens=16), lm.stop_ids)]
        ref.append(ids)
    outs = smol.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    assert [o.token_ids for o in outs] == ref
    assert outs[0].text.strip().startswith("Paris")


def test_default_llm_keeps_the_gguf_blocks():
    """LLM() runs the GGUF's own Q4_1/Q8_0 blocks (attnkit.quant.native) and still answers."""
    from attnkit.quant.native import GGUFBlockLinear, library

    llm = LLM()
    blocks = [m for m in llm.engine.model.modules() if isinstance(m, GGUFBlockLinear)]
    assert bool(blocks) == (library() is not None)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.text.strip().startswith("Paris")


def test_chat_on_the_default_model(smol):
    convs = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Name a colour."}]]
    outs = smol.chat(convs, SamplingParams(temperature=0, max_tokens=12))
    one = smol.chat(convs[0], SamplingParams(temperature=0, max_tokens=12))
    assert len(outs) == 2 and outs[0].text == one[0].text and "4" in one[0].text
