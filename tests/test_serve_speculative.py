"""Speculative decoding from the command line: ``attnkit serve --speculative ngram`` answers the official ``openai``
client exactly as the plain engine does (greedy) and reports its drafts on /metrics; ``attnkit generate
--speculative`` prints what the plain command prints; bad ``--speculative`` values are one-line errors naming the
flag. On the embedded default model (SmolLM2-135M, its GGUF blocks)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from engine_helpers import skip_module_without_default_model
from safetensors.torch import save_file
from serve_helpers import metric, metrics, running

from attnkit.cli import build_parser, main
from attnkit.engine import LLM, SamplingParams
from attnkit.serve.cli import build_from_args

skip_module_without_default_model()

PROMPTS = ["Repeat exactly: the quick brown fox jumps over the lazy dog.\nthe quick brown fox jumps over the lazy dog.\n",
           "Repeat exactly: 1 2 3 4 5 6 7 8\n1 2 3 4 5 6 7 8\n",
           "Copy this list: apples, pears, plums, figs.\nCopy this list: apples, pears, plums, figs.\n"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def reference():
    llm = LLM(kv_cache_bytes=16 << 20)
    return [o.text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]


@pytest.fixture(scope="module")
def server():
    args = build_parser().parse_args(["serve", "--no-embeddings", "--kv-cache-mb", "16", "--speculative", "ngram",
                                      "--num-speculative-tokens", "4"])
    app, engine = build_from_args(args)
    assert engine.spec is not None and engine.spec.config.num_speculative_tokens == 4
    with running(app) as url:
        yield url, app.state.serve.model_name


def test_server_greedy_completions_equal_the_plain_engine(server, reference):
    base, name = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(prompt: str) -> str:
        return client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched: several sequences verify drafts in one step
        assert list(pool.map(ask, PROMPTS)) == reference
    assert [ask(p) for p in PROMPTS[:2]] == reference[:2]  # one at a time


def test_metrics_report_the_drafts(server):
    base, name = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    client.completions.create(model=name, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS)
    m = metrics(base)
    drafts = m[("attnkit_spec_decode_num_draft_tokens_total", ())]
    accepted = m[("attnkit_spec_decode_num_accepted_tokens_total", ())]
    verifications = m[("attnkit_spec_decode_num_verifications_total", ())]
    assert drafts > 0 and 0 < verifications <= drafts and 0 <= accepted <= drafts
    assert m[("attnkit_spec_decode_acceptance_rate", ())] == pytest.approx(accepted / drafts)
    assert 0 <= m[("attnkit_spec_decode_acceptance_rate", ())] <= 1
    assert 1 <= m[("attnkit_spec_decode_mean_accepted_length", ())] <= 5  # k = 4: at most 4 drafts + 1


def test_no_spec_metrics_without_speculation():
    args = build_parser().parse_args(["serve", "--no-embeddings", "--kv-cache-mb", "16"])
    app, engine = build_from_args(args)
    assert engine.spec is None
    with running(app) as base:
        assert metric(base, "attnkit_kv_cache_blocks_total") > 0
        assert not any(name.startswith("attnkit_spec_decode") for name, _ in metrics(base))


def _draft_dir(path, vocab: int) -> str:
    """A one-layer random Llama saved as a Hugging Face directory."""
    d, ff = 16, 32
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,),
         "model.layers.0.input_layernorm.weight": (d,), "model.layers.0.post_attention_layernorm.weight": (d,),
         "model.layers.0.mlp.gate_proj.weight": (ff, d), "model.layers.0.mlp.up_proj.weight": (ff, d),
         "model.layers.0.mlp.down_proj.weight": (d, ff)}
    t.update({f"model.layers.0.self_attn.{p}_proj.weight": (d, d) for p in "qkvo"})
    path.mkdir()
    save_file({k: torch.randn(s, generator=g) for k, s in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": ff, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu"}))
    (path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}))
    return str(path)


def test_bad_speculative_flags_are_one_line_errors(tmp_path, capsys):
    cases = [(["--speculative", "medusa"], "--speculative medusa: speculative method must be one of"),
             (["--speculative", "draft:"], "--speculative draft:PATH needs the draft model's path"),
             (["--speculative", "layerskip:abc"], "--speculative layerskip:N needs a number of layers"),
             (["--speculative", "ngram:3"], "--speculative ngram takes no argument"),
             (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens 0: "),
             (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative"),
             (["--speculative", "layerskip:99"], "--speculative layerskip:99: the draft's layers must be in [1, 29]"),
             (["--speculative", f"draft:{tmp_path / 'missing'}"], "missing"),
             (["--speculative", f"draft:{_draft_dir(tmp_path / 'small', 16)}"], "vocabulary (16 tokens) differs")]
    for flags, message in cases:
        for command in (["serve", "--no-embeddings", "--kv-cache-mb", "16"], ["generate", "hi", "--max-tokens", "2"]):
            assert main(command + flags) == 2, flags
            out, err = capsys.readouterr()
            assert err.startswith(f"attnkit {command[0]}: error: ") and message in err, (flags, err)
            assert err.count("\n") == 1 and "Traceback" not in err and out == "", err


def test_generate_with_speculation_prints_the_plain_output(tmp_path, capsys):
    prompt = PROMPTS[0]
    args = ["generate", prompt, "--max-tokens", "16"]
    assert main(args) == 0
    plain, err = capsys.readouterr()
    assert "speculative" not in err
    assert main(args + ["--speculative", "ngram"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and out.startswith(prompt)
    line = err.splitlines()[-1]
    assert line.startswith("[speculative ngram: acceptance rate ") and "mean accepted length" in line
    # a draft model (here a random one with the target's vocabulary), loaded as the target is
    assert main(args + ["--speculative", f"draft:{_draft_dir(tmp_path / 'draft', 49152)}"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "[speculative draft: acceptance rate " in err
