"""Checkpoints without pickle: weights and optimizer state in safetensors, everything else in JSON.

A checkpoint directory holds
  config.json          model type, model config, vocabulary, task, training arguments
  model.safetensors    the weights (tied weights stored once)
  optimizer.safetensors  Adam's moment estimates, keyed by parameter name (optional)
  trainer_state.json   step, scheduler state, examples consumed (optional)
It is written to a temporary sibling directory, flushed to disk and renamed into place
(:func:`commit_dir`), so an interrupted save never leaves a half-written checkpoint behind: a crash
at any point leaves the previous or the new checkpoint, which :func:`recover_dir` puts back in place.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

MODEL_TYPES = {
    "seq2seq_transformer": ("attnkit.models.transformer", "Seq2SeqConfig", "Seq2SeqTransformer"),
    "lstm_seq2seq": ("attnkit.models.lstm_seq2seq", "LSTMSeq2SeqConfig", "LSTMSeq2Seq"),
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model it is loaded into."""


def model_type_of(model: nn.Module) -> str:
    for name, (module, _, cls) in MODEL_TYPES.items():
        if type(model).__name__ == cls and type(model).__module__ == module:
            return name
    raise CheckpointError(f"no checkpoint model type registered for {type(model).__qualname__}")


def build_model(model_type: str, config: dict) -> nn.Module:
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    module, cfg_cls, model_cls = MODEL_TYPES[model_type]
    mod = importlib.import_module(module)
    return getattr(mod, model_cls)(getattr(mod, cfg_cls).from_dict(config))


#: test hook: "<point>:<n>" SIGKILLs the process at ``point`` ("written": the new checkpoint is complete in
#: its temporary directory; "moved": the previous one is renamed away, the new one not yet in place) of its
#: n-th :func:`commit_dir` — a crash at the worst moments of a save
KILL_ENV = "ATTNKIT_TEST_KILL_IN_SAVE"
_commits = 0


def _test_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == f"{point}:{_commits}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: Path, path: Path) -> None:
    """Put the fully written directory ``tmp`` in place as ``path`` (a sibling): its files are flushed,
    ``path`` is renamed to ``.<name>.old``, ``tmp`` to ``path``, then the old one deleted. Each rename
    is atomic, so at every moment ``path`` or ``.<name>.old`` is a complete checkpoint."""
    global _commits
    _commits += 1
    for f in tmp.iterdir():
        _fsync(f)
    _test_kill("written")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    _test_kill("moved")
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> Path:
    """After a crash inside :func:`commit_dir`: the previous checkpoint back in place if the new one never
    got there, and the leftovers (temporary and old directories ``.<name>.*``) removed. Only for the
    run's own writer (a resume): a reader calling it during a save would break the save."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    for stale in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    return path


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}  # named_parameters skips tied duplicates


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, trainer_state: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. ``meta`` goes into config.json (vocab, task, args)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = {"model_type": model_type_of(model), "config": model.config.to_dict(), **meta}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            names = _param_names(model)
            tensors = {}
            for p, state in optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        tensors[f"{names[id(p)]}::{key}"] = value.detach().contiguous()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an attnkit checkpoint directory?)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    for key in ("model_type", "config"):
        if key not in config:
            raise CheckpointError(f"{cfg_file}: missing field {key!r}")
    return config


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from config.json and load its weights; returns (model, config dict)."""
    path = Path(path)
    config = read_config(path)
    try:
        model = build_model(config["model_type"], config["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid model config ({e})") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{weights}: does not match the model in config.json ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors missing {sorted(missing)} / unexpected {sorted(unexpected)}")
    return model, config


def load_optimizer_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill ``optimizer`` (already built over ``model``'s parameters) from optimizer.safetensors."""
    file = Path(path) / "optimizer.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; cannot resume the optimizer")
    try:
        tensors = load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{file}: state for unknown parameter {name!r}")
        optimizer.state[params[name]][field] = value


def read_trainer_state(path: str | Path) -> dict:
    file = Path(path) / "trainer_state.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; this checkpoint cannot be resumed")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
