"""The family registry: `attnkit models` lists every family with what attnkit does with it, and the loaders'
errors name the supported lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.cli import main
from attnkit.loading.errors import UnsupportedModelError
from attnkit.loading.hf import model_config, supported_types
from attnkit.models import registry


def test_attnkit_models_lists_every_family(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["family"] for r in rows}
    assert {"llama", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "olmoe", "gpt2", "bert"} <= names
    assert all(set(registry.COLUMNS) <= set(r) for r in rows)
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "qwen3moe" in table and "C step" in table


def test_registry_is_consistent():
    fams = registry.families()
    assert len({f.name for f in fams}) == len(fams)
    types = [t for f in fams for t in f.hf_types]
    archs = [a for f in fams for a in f.gguf_archs]
    assert len(types) == len(set(types)) and len(archs) == len(set(archs))  # one family per checkpoint name
    for f in fams:
        assert registry.by_name(f.name) is f and f.example and set(f.supports) == set(registry.COLUMNS), f.name


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        model_config({"model_type": "mamba"}, Path("config.json"))
    assert "mamba" in str(e.value) and all(t in str(e.value) for t in supported_types())
