"""Hugging Face directories: the whole-or-nothing loading rules and their error messages, and the
tokenizer / generation_config files that come with a checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from attnkit.loading import ModelLoadError, UnsupportedModelError, load_causal_lm, load_sentence_encoder  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402

CFG = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "fox"] + [f"w{i}" for i in range(25)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).save_pretrained(d, safe_serialization=True)
    _tokenizer_json(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6], "temperature": 0.6}))
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_causal_lm_from_hf_dir(llama_dir):
    lm = load_causal_lm(llama_dir)
    assert lm.tokenizer.encode("hello world") == [1, 3, 4]  # add_bos_token from tokenizer_config.json
    assert lm.stop_ids == {2, 6}  # tokenizer EOS + generation_config.json eos_token_id list
    assert lm.generation["temperature"] == 0.6
    assert lm.tokenizer.chat_template is None


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_hf_model(d)
    assert e.value.tensor == "model.layers.1.mlp.up_proj.weight" and "missing tensor" in e.value.reason


def test_unexpected_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "u")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected tensor") as e:
        load_hf_model(d)
    assert e.value.tensor == "model.layers.0.self_attn.q_norm.weight"


def test_shape_mismatch_names_file_and_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_hf_model(d)
    assert "shape mismatch" in e.value.reason and e.value.tensor.startswith("model.layers.0.mlp.")
    assert e.value.file == str(d / "model.safetensors")


def test_truncated_safetensors(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_hf_model(d)
    assert e.value.file == str(d / "model.safetensors") and "truncated or corrupt" in e.value.reason


def test_missing_shard(tmp_path):
    d = tmp_path / "sh"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match="shard listed in model.safetensors.index.json is missing") as e:
        load_hf_model(d)
    assert e.value.file == str(shards[-1])


def test_unsupported_model_type(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba' is not supported"):
        load_causal_lm(d)
    cfg.update(model_type="llama", rope_scaling={"rope_type": "proportional", "factor": 4.0})  # (yarn: test_rope_scaling.py)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'proportional'"):
        load_causal_lm(d)


def test_pickle_checkpoints_are_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "p")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin checkpoints are not loaded"):
        load_hf_model(d)


def test_wrong_kind_of_model(llama_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_causal_lm(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="BERT-family"):
        load_sentence_encoder(llama_dir)
    b = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=48)).save_pretrained(b)
    with pytest.raises(ModelLoadError, match="encoder, not a language model"):
        load_causal_lm(b)


def test_sampling_defaults_from_generation_config():
    import argparse

    from attnkit.engine.cli import _params

    flags = dict(max_new_tokens=5, temperature=None, top_k=None, top_p=None, seed=None)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    p = _params(argparse.Namespace(**flags), gen)
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 0, 0.9)
    p = _params(argparse.Namespace(**{**flags, "temperature": 0.0}), gen)  # a flag wins
    assert (p.temperature, p.top_p) == (0.0, 0.9)
    p = _params(argparse.Namespace(**flags), {"do_sample": False, "temperature": 0.6})  # greedy checkpoint
    assert (p.temperature, p.top_k, p.top_p) == (0.0, 0, 1.0)


def test_sentence_transformers_pooling_config(tmp_path):
    from attnkit.loading.hf import sentence_transformers_config

    assert sentence_transformers_config(tmp_path, 512) == ("mean", False, 512)  # a plain model
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    pool = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert sentence_transformers_config(tmp_path, 512) == ("cls", True, 128)
    pool.update(pooling_mode_cls_token=False, pooling_mode_max_tokens=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    with pytest.raises(UnsupportedModelError, match="pooling_mode_max_tokens"):
        sentence_transformers_config(tmp_path, 512)
