"""`attnkit generate/chat` on the engine, for the Llama family and GPT-2 alike."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from attnkit.engine import SamplingParams
from attnkit.decoding.generate import SamplingParams as SimpleParams
from attnkit.decoding.generate import generate
from attnkit.loading import CausalLM
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.engine.cli import _engine, stream
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: F401

skip_module_without_default_model()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cli_stream_matches_single_stream_decoding(tokenizer, family):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2(GPT2Config(vocab_size=tokenizer.vocab_size, max_seq_len=128, d_model=32, n_layers=2, n_heads=2,
                                d_ff=64)).eval()
    else:
        model = tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    lm = CausalLM(model, tokenizer, Path("tiny"))
    prompt = tokenizer.encode("Hello there")
    ref = list(generate(model, prompt, SimpleParams(max_new_tokens=10), lm.stop_ids))
    out = io.StringIO()
    ids = list(stream(_engine(lm), prompt, SamplingParams(temperature=0, max_tokens=10), out))
    assert ids == ref
    assert out.getvalue() == tokenizer.decode([t for t in ref if t not in lm.stop_ids])
