"""Filling a model built from a config with a checkpoint's tensors — all of them or none.

The model is constructed on the meta device (no memory, no random init). Every parameter it
expects is looked up through a *plan*: ``our name → (checkpoint tensor name, loader)``, where the
loader returns the tensor already in our layout (transposed, split, unpermuted). Missing tensors
are reported before anything is read; a wrong shape names the checkpoint tensor; leftover
tensors the plan did not use are an error too, unless declared ignorable (so a mis-mapped
checkpoint cannot load "successfully" with part of its weights dropped).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from .errors import ModelLoadError

M = TypeVar("M", bound=nn.Module)
Loader = Callable[[], torch.Tensor]
Plan = dict[str, tuple[str, Loader]]


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_", "constant_")


@contextmanager
def _no_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while a model is built on the meta device.

    There is nothing to initialise there, and a meta ``normal_`` goes through torch's Python
    reference ops, whose first use imports torch._dynamo (~1.8 s) — most of a cold load. (The same
    practice as transformers' ``no_init_weights``; the functions are restored on exit.)
    """
    saved = {n: getattr(nn.init, n) for n in _INITS}
    try:
        for n in _INITS:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def expected_shapes(model_cls: Callable[..., M], cfg: object) -> tuple[M, dict[str, torch.Size]]:
    """The model on the meta device and the shapes of its state dict (parameters and persistent buffers)."""
    with torch.device("meta"), _no_init():
        model = model_cls(cfg)
    return model, {k: v.shape for k, v in model.state_dict().items()}


def check_present(file: str | Path, plan: Plan, available: Iterable[str]) -> None:
    have = set(available)
    for ours, (src, _) in plan.items():
        if src not in have:
            raise ModelLoadError(file, f"missing tensor (needed for {ours})", tensor=src)


def check_leftovers(file: str | Path, plan: Plan, available: Iterable[str], ignorable: Iterable[str] = ()) -> None:
    used = {src for src, _ in plan.values()}
    patterns = [re.compile(p) for p in ignorable]
    for name in available:
        if name not in used and not any(p.fullmatch(name) for p in patterns):
            raise ModelLoadError(file, "unexpected tensor: the checkpoint has it but the configured model has no "
                                       "place for it (wrong config or unsupported variant)", tensor=name)


def materialize(model: M, shapes: dict[str, torch.Size], plan: Plan, file: str | Path,
                dtype: torch.dtype = torch.float32, file_of: Callable[[str], str | Path] | None = None) -> M:
    """Load every tensor of ``plan`` (checking shapes) and assign them to the meta-device ``model``.

    ``file_of(tensor)`` names the file holding a tensor (a shard) for error messages; default ``file``.
    """
    missing = sorted(set(shapes) - set(plan))
    if missing:
        raise ModelLoadError(file, f"no checkpoint tensor maps to {missing[0]} ({len(missing)} unmapped)")
    state: dict[str, torch.Tensor] = {}
    for ours, (src, load) in plan.items():
        if ours not in shapes:
            raise ModelLoadError(file, f"maps to {ours}, which the configured model does not have", tensor=src)
        t = load()
        if t.shape != shapes[ours]:
            where = file if file_of is None else file_of(src)
            raise ModelLoadError(where, f"shape mismatch: checkpoint gives {tuple(t.shape)} for {ours}, the config "
                                       f"implies {tuple(shapes[ours])}", tensor=src)
        state[ours] = t.to(dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
