"""`attnkit generate`, `chat` and `embed` on the embedded default models (in-process)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import attnkit.loading as loading  # noqa: E402
import attnkit.loading.defaults  # noqa: E402,F401
from attnkit.cli import main  # noqa: E402
from attnkit.decoding.generate import SamplingParams, generate  # noqa: E402
from attnkit.text.chat_template import render_chat  # noqa: E402

try:
    loading.defaults.default_chat_model()
    loading.defaults.default_embedding_model()
except loading.ModelLoadError as e:  # pragma: no cover
    pytest.skip(f"default models not installed: {e}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the commands' --threads sets torch's global


@pytest.fixture(scope="module")
def lm():
    return loading.load_causal_lm()


@pytest.fixture
def cached(lm, monkeypatch):
    real = loading.load_causal_lm
    monkeypatch.setattr(loading, "load_causal_lm", lambda path=None, dtype=torch.float32, **kw: lm if path is None else real(path, dtype, **kw))
    return lm


def _greedy_text(lm, prompt_ids, n):
    ids = [t for t in generate(lm.model, prompt_ids, SamplingParams(max_new_tokens=n), lm.stop_ids) if t not in lm.stop_ids]
    return lm.tokenizer.decode(ids)


def _chat_ids(lm, messages):
    text = render_chat(lm.tokenizer.chat_template, messages, bos_token=lm.tokenizer.bos_token)
    return lm.tokenizer.encode(text, add_special_tokens=False)


def test_generate_streams_and_reports_speed(lm, capsys):
    rc = main(["generate", "The capital of France is", "--max-new-tokens", "8", "--threads", "1", "--quantize", "none"])
    out, err = capsys.readouterr()
    assert rc == 0
    want = _greedy_text(lm, lm.tokenizer.encode("The capital of France is"), 8)
    assert out == "The capital of France is" + want + "\n"
    assert "tokens/s" in err and "8 tokens" in err


def test_generate_sampling_is_seeded(cached, capsys):
    args = ["generate", "Once upon a time", "--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "40",
            "--top-p", "0.9", "--threads", "1", "--quantize", "none"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_chat_multi_turn_and_reset(cached, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\n/reset\nName a colour.\n/quit\n"))
    assert main(["chat", "--max-new-tokens", "12", "--threads", "1", "--quantize", "none"]) == 0
    out, err = capsys.readouterr()
    first = _greedy_text(cached, _chat_ids(cached, [{"role": "user", "content": "What is 2+2?"}]), 12)
    # after /reset the second question is answered as the first turn of a new conversation
    second = _greedy_text(cached, _chat_ids(cached, [{"role": "user", "content": "Name a colour."}]), 12)
    assert out == first + "\n" + second + "\n"
    assert "[conversation cleared]" in err


def test_chat_keeps_history(cached, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Ada.\nWhat is my name?\n"))
    assert main(["chat", "--max-new-tokens", "10", "--threads", "1", "--quantize", "none"]) == 0
    out = capsys.readouterr().out
    reply1 = _greedy_text(cached, _chat_ids(cached, [{"role": "user", "content": "My name is Ada."}]), 10)
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": reply1},
               {"role": "user", "content": "What is my name?"}]
    assert out == reply1 + "\n" + _greedy_text(cached, _chat_ids(cached, history), 10) + "\n"


def test_ctrl_c_stops_the_reply_not_the_program(cached, monkeypatch, capsys):
    from attnkit.engine import LLMEngine

    calls = {"n": 0, "steps": 0}
    real_add, real_step = LLMEngine.add_request, LLMEngine.step

    def add(self, *a, **k):
        calls["n"] += 1
        return real_add(self, *a, **k)

    def step(self):
        calls["steps"] += 1
        if calls["n"] == 1 and calls["steps"] == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "add_request", add)
    monkeypatch.setattr(LLMEngine, "step", step)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a long story.\nThanks!\n"))
    assert main(["chat", "--max-new-tokens", "6", "--threads", "1", "--quantize", "none"]) == 0
    out, err = capsys.readouterr()
    assert "[reply stopped]" in err and calls["n"] == 2  # the REPL went on to the second turn
    assert err.count("tokens/s") == 2


def test_chat_without_template_is_an_error(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_missing_model_is_an_error(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert "missing.gguf" in err and "no such file" in err


def test_embed_similarity_and_vectors(capsys):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]
    assert main(["embed", *texts]) == 0
    out = capsys.readouterr().out
    e = loading.load_sentence_encoder().embed(texts)
    rows = [line.split()[1:] for line in out.splitlines()[-3:]]
    got = torch.tensor([[float(x) for x in r] for r in rows])
    torch.testing.assert_close(got, e @ e.T, atol=1e-4, rtol=0)
    assert got[0, 1] > got[0, 2]  # eating food is closer to eating bread than to the sky
    assert main(["embed", "hello", "--output", "vectors"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["text"] == "hello" and len(v["embedding"]) == 384


def test_generate_with_a_lora_adapter_equals_the_merged_model(tmp_path, capsys):
    from attnkit.peft import LoraConfig, PeftModel, get_peft_model

    base = loading.load_causal_lm()
    peft = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(tmp_path / "lora")
    merged = PeftModel.from_pretrained(loading.load_causal_lm().model, tmp_path / "lora").merge_and_unload()
    prompt = "The capital of France is"
    want = _greedy_text(loading.CausalLM(merged, base.tokenizer, base.path, base.generation),
                        base.tokenizer.encode(prompt), 8)
    fresh = loading.load_causal_lm()
    assert want != _greedy_text(fresh, fresh.tokenizer.encode(prompt), 8)
    args = ["generate", prompt, "--max-new-tokens", "8", "--threads", "1"]
    assert main(args + ["--quantize", "none", "--lora", str(tmp_path / "lora")]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"
    # on the default GGUF blocks too: the adapter's update is added to the quantized base's products
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--lora", str(tmp_path / "lora")]) == 0
    assert capsys.readouterr().out not in (plain, "")
    assert main(args + ["--lora", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_generate_json_schema_and_max_tokens(tmp_path, capsys):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema))
    rc = main(["generate", "Describe a person named Bob aged 30 as JSON.", "--chat", "--json-schema", str(path),
               "--max-tokens", "60", "--threads", "1"])
    assert rc == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert main(["generate", "hi", "--regex", "(ab", "--max-tokens", "4"]) == 2
    assert "structured.regex: invalid regex" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["generate", "hi", "--json-schema", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one constraint at a time
        main(["generate", "hi", "--regex", "a", "--choice", "a"])
