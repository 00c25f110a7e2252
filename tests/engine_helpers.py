"""Shared fixtures for the engine tests: a tiny random Llama and a greedy reference decoder."""

from __future__ import annotations

import pytest
import torch

from attnkit import loading
from attnkit.engine import LLM, EngineConfig, SamplingParams
from attnkit.loading import defaults
from attnkit.models.llama import Llama, LlamaConfig


def skip_module_without_default_model() -> None:
    """Call at import time of a test module that needs the embedded SmolLM2."""
    try:
        defaults.default_chat_model()
    except loading.ModelLoadError as e:  # pragma: no cover
        pytest.skip(f"default model not installed: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer, built from its GGUF metadata."""
    from attnkit.loading.gguf_file import GGUFFile
    from attnkit.text.tokenizer import Tokenizer

    path = defaults.default_chat_model()
    return Tokenizer.from_gguf(GGUFFile(path).metadata, path)


def tiny_llama(vocab: int = 320, seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=1024)
    cfg.update(kw)
    m = Llama(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties in argmax
        m.tok_embeddings.weight.mul_(20)
    return m


@torch.inference_mode()
def greedy_reference(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Plain full-recompute greedy decoding, no cache at all."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(n: int, vocab: int, lo: int = 1, hi: int = 80, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def make_llm(model: Llama, tokenizer=None, eos_ids=frozenset(), **cfg) -> LLM:
    return LLM.from_model(model, tokenizer, EngineConfig(**cfg), eos_ids=set(eos_ids))


GREEDY = SamplingParams(temperature=0, max_tokens=8)


def engine_greedy(engine, prompts: list[list[int]], n: int, c_step: bool = True) -> list[list[int]]:
    """Each prompt's ``n`` greedy tokens from ``engine`` (an LLMEngine), all queued at once; ``c_step`` False keeps
    its decode steps eager (no C decode step)."""
    from attnkit.engine import SamplingParams

    if not c_step:
        engine.runner.native = False
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    got = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                got[tuple(o.prompt_token_ids)] = list(o.token_ids)
    return [got[tuple(p)] for p in prompts]
