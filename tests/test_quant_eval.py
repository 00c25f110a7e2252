"""attnkit.eval: perplexity with a strided window, KL divergence and greedy agreement, on tiny models where
the answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import tiny_llama

from attnkit.eval import divergence, greedy_agreement, greedy_tokens, perplexity, shipped_text


class Bigram(nn.Module):
    """Logits depend on the current token only: the perplexity cannot depend on the window."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)  # (B, T, vocab)


IDS = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))


def manual_ppl(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None])[0]
    return math.exp(float(F.cross_entropy(logits[:-1], ids[1:])))


def test_one_window_is_the_textbook_formula():
    torch.manual_seed(0)
    m = tiny_llama(vocab=50)
    p = perplexity(m, IDS[:100], window=128)
    assert p.n_tokens == 99 and math.isclose(p.ppl, manual_ppl(m, IDS[:100]), rel_tol=1e-5)
    assert math.isclose(math.log(p.ppl), p.nll, rel_tol=1e-9)


@pytest.mark.parametrize("window,stride", [(301, 150), (64, 63), (64, 16), (100, 37), (2, 1)])
def test_every_token_scored_once_whatever_the_window(window, stride):
    torch.manual_seed(0)
    m = Bigram()
    p = perplexity(m, IDS, window=window, stride=stride)
    assert p.n_tokens == len(IDS) - 1
    assert math.isclose(p.ppl, manual_ppl(m, IDS), rel_tol=1e-5)


def test_strided_windows_give_context():
    """A real model scores better with overlapping windows (more context per token) than with disjoint ones."""
    m = tiny_llama(vocab=50)
    ids = torch.arange(200) % 7  # a periodic text: predictable from context
    assert perplexity(m, ids, 32, 8).nll != perplexity(m, ids, 32, 31).nll  # different contexts, same tokens
    for stride in (0, 32, 64):
        with pytest.raises(ValueError, match="stride"):
            perplexity(m, ids, 32, stride)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(m, [1], 32, 8)


def test_divergence_and_agreement():
    a, b = tiny_llama(vocab=64, seed=0), tiny_llama(vocab=64, seed=1)
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    same = divergence(a, a, ids)
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0 and same.n_positions == 40
    other = divergence(a, b, ids)
    assert other.kl > 0.01 and other.top1 < 1.0
    prompt = [1, 2, 3]
    ag = greedy_agreement(a, a, prompt, 16)
    assert ag.rate == 1.0 and ag.prefix == 16 and ag.tokens == greedy_tokens(a, prompt, 16)
    ag2 = greedy_agreement(a, b, prompt, 16)
    tf = b(torch.tensor([prompt + ag.tokens[:-1]]))[0, 2:].argmax(-1).tolist()  # b fed a's tokens
    want = [x == y for x, y in zip(ag.tokens, tf)]
    assert ag2.rate == sum(want) / 16 and ag2.prefix == (want.index(False) if False in want else 16)
    assert greedy_agreement(a, b, prompt, 16, tokens_a=ag.tokens) == ag2
    with pytest.raises(ValueError, match="expected n=16"):
        greedy_agreement(a, b, prompt, 16, tokens_a=ag.tokens[:3])


def test_greedy_tokens_with_and_without_cache():
    m = tiny_llama(vocab=64)
    no_cache = nn.Module()  # the same model behind a forward without a cache
    no_cache.forward = lambda idx: m(idx)  # type: ignore[method-assign]
    assert greedy_tokens(m, [5, 6], 12) == greedy_tokens(no_cache, [5, 6], 12)


def test_shipped_text():
    text = shipped_text()
    assert text.startswith("IN CONGRESS, July 4, 1776.") and "We hold these truths to be self-evident" in text
    assert "public domain" not in text  # the header paragraph is not scored
    with pytest.raises(ValueError, match="no shipped text 'nope'"):
        shipped_text("nope")


def test_engine_perplexity_is_the_chunked_perplexity_of_the_model():
    """llama-perplexity's chunks scored by the engine (prompt log-probabilities, chunked prefill over a paged
    float32 K/V cache) equal the model's own chunked perplexity, with or without a BOS in each chunk."""
    from attnkit.engine import EngineConfig
    from attnkit.engine.llm import LLM
    from attnkit.eval.perplexity import chunked_perplexity, engine_perplexity

    m = tiny_llama(vocab=50)
    llm = LLM.from_model(m, None, EngineConfig(kv_cache_dtype="float32", block_size=8, max_num_batched_tokens=40),
                         eos_ids=set())
    for bos in (None, 3):
        ours = engine_perplexity(llm, IDS, n_ctx=64, bos=bos)
        ref = chunked_perplexity(m, IDS, n_ctx=64, bos=bos)
        assert ours.n_tokens == ref.n_tokens == 4 * 31
        assert ours.ppl == pytest.approx(ref.ppl, rel=1e-5)
        assert 0 < ours.ppl_std_err < ours.ppl
    with pytest.raises(ValueError, match="at least one chunk"):
        engine_perplexity(llm, IDS[:50], n_ctx=64)


def test_the_perplexity_command(tmp_path, capsys):
    """``attnkit perplexity``: llama-perplexity's figure for the embedded default through the engine; a text
    shorter than one chunk, or one that cannot be read, is a clear error."""
    import json

    from attnkit.cli import main
    from attnkit.engine.llm import LLM
    from attnkit.eval.perplexity import engine_perplexity

    assert main(["perplexity", "--ctx", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    llm = LLM()
    want = engine_perplexity(llm, llm.tokenizer.encode(shipped_text()), 256)
    assert out["ppl"] == want.ppl and out["tokens_scored"] == want.n_tokens and out["chunks"] == 13
    assert 5 < out["ppl"] < 60 and out["ppl_std_err"] > 0
    short = tmp_path / "short.txt"
    short.write_text("Four score and seven years ago.")
    assert main(["perplexity", "--file", str(short)]) == 2
    assert "fewer than one chunk of --ctx 512" in capsys.readouterr().err
    assert main(["perplexity", "--file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_chunked_divergence_is_llama_perplexitys_kl_over_the_scored_tokens():
    from attnkit.eval import chunked_divergence

    a = tiny_llama(vocab=50)
    b = tiny_llama(vocab=50, seed=1)
    same = chunked_divergence(a, a, IDS, n_ctx=64)
    assert same.kl == 0.0 and same.top1 == 1.0 and same.n_tokens == 4 * 31
    d = chunked_divergence(b, a, IDS, n_ctx=64)  # KL(P_a ‖ P_b) on the second half of each chunk
    kl, top = [], []
    with torch.no_grad():
        for c in range(4):
            chunk = IDS[c * 64:(c + 1) * 64]
            la = torch.log_softmax(a(chunk[None])[0, 32:-1].double(), -1)
            lb = torch.log_softmax(b(chunk[None])[0, 32:-1].double(), -1)
            kl.append((la.exp() * (la - lb)).sum(-1))
            top.append(la.argmax(-1) == lb.argmax(-1))
    kl = torch.cat(kl)
    assert d.kl == pytest.approx(float(kl.mean()), rel=1e-9) and d.kl > 0
    assert d.top1 == pytest.approx(float(torch.cat(top).double().mean()))
    assert d.kl_p99 == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-9) and d.kl_std_err > 0
    from attnkit.eval import chunked_perplexity  # the NLLs the same logits give: each model's chunked perplexity

    assert d.nll == pytest.approx(chunked_perplexity(b, IDS, n_ctx=64).nll, rel=1e-6)
    assert d.base_nll == pytest.approx(chunked_perplexity(a, IDS, n_ctx=64).nll, rel=1e-6)


def test_the_perplexity_command_against_a_base(capsys):
    """--kl-base: the default model against itself diverges by nothing; a base that is not there is named."""
    import json

    from attnkit.cli import main
    from attnkit.loading import defaults

    assert main(["perplexity", "--kl-base", "/nonexistent/base.gguf"]) == 2
    assert "/nonexistent/base.gguf" in capsys.readouterr().err

    assert main(["perplexity", "--ctx", "512", "--json", "--kl-base", str(defaults.default_chat_model())]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kl"]["kld"] == 0.0 and out["kl"]["same_top"] == 1.0 and out["kl"]["ln_ppl_ratio"] == 0.0
    assert out["kl"]["base_ppl"] == pytest.approx(out["ppl"], rel=0.02) and out["kl"]["tokens"] == 1530
