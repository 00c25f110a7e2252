"""LoRA adapters served side by side on one base model, batched in one step (multi-LoRA serving).

A merged adapter computes (W₀ + ΔW_a)·x with ΔW_a = (α_a/r_a)·B_a·A_a (Hu et al. 2021, §4.1). To serve
many adapters at once the engine keeps W₀ unmerged and, in every adapted projection, adds for the
tokens of each adapter present in the step

    y[rows_a] += (x[rows_a] · A_aᵀ) · (s_a·B_a)ᵀ

— the per-adapter gather/scatter of Punica (Chen et al. 2023) and S-LoRA (Sheng et al. 2023). The base
product stays one matrix product over the whole packed batch, whatever the mix of adapters.

The engine fuses q/k/v and gate/up into one projection (:mod:`attnkit.nn.fused`); an adapter's A's for
those parts are stacked and its B's laid out block-diagonally over the fused output, so one pair of thin
products serves all parts. Adapters are read in HF PEFT's format (:mod:`attnkit.peft.save_load`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn.moe import routed_rows

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass
class StepAdapters:
    """Which adapter each token of the step's packed batch uses (set by the model runner every step)."""

    token_adapter: torch.Tensor | None = None  # (N,) adapter id per token; None: only the base runs this step
    single: int | None = None  # the adapter id of every token, when they all share one
    _masks: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def set(self, adapter_ids: list[int], counts: list[int], device: torch.device) -> None:
        """Per-sequence adapter ids and token counts, in packing order (0 = the base)."""
        self.clear()
        if not any(adapter_ids):
            return
        if len(set(adapter_ids)) == 1:
            self.single = adapter_ids[0]
        self.token_adapter = torch.repeat_interleave(torch.tensor(adapter_ids), torch.tensor(counts)).to(device)

    def clear(self) -> None:
        self.token_adapter, self.single = None, None
        self._masks.clear()
        self._rows.clear()

    def mask(self, columns: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(N, R): 1 where column r (of adapter ``columns[r]``) belongs to the token's adapter, else 0."""
        m = self._masks.get(columns)
        if m is None:
            assert self.token_adapter is not None
            cols = torch.tensor(columns, device=self.token_adapter.device)
            m = self._masks[columns] = (self.token_adapter[:, None] == cols[None, :]).to(dtype)
        return m

    def rows(self, adapter: int) -> torch.Tensor:
        """The packed rows of the tokens using ``adapter``."""
        r = self._rows.get(adapter)
        if r is None:
            assert self.token_adapter is not None
            r = self._rows[adapter] = (self.token_adapter == adapter).nonzero().squeeze(1)
        return r


class MultiLoraLinear(nn.Module):
    """A base projection plus every loaded adapter's low-rank update, stacked: ``A`` (R, in) holds the adapters'
    A's one after the other, ``B`` (out, R) their B's (scaling folded in), ``columns[r]`` the adapter of column r.

    A step whose tokens all use one adapter takes that adapter's slice. A mixed step computes x·Aᵀ for every
    column, zeroes the columns of other adapters per token, and adds the product with Bᵀ: three operations
    whatever the number of adapters in the batch — or, once the stacked rank outgrows ``in_features / 2``,
    gathers each present adapter's rows instead.
    """

    def __init__(self, base: nn.Module, step: StepAdapters) -> None:
        super().__init__()
        self.base, self.step = base, step
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stack()

    def set_update(self, adapter: int, update: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if update is None:
            self.updates.pop(adapter, None)
        else:
            self.updates[adapter] = update
        self._stack()

    def _stack(self) -> None:
        ups = self.updates
        self.columns = tuple(a for a, (A, _) in ups.items() for _ in range(A.shape[0]))
        self.spans: dict[int, tuple[int, int]] = {}
        r = 0
        for a, (A, _) in ups.items():
            self.spans[a] = (r, r + A.shape[0])
            r += A.shape[0]
        self.A = torch.cat([A for A, _ in ups.values()]) if ups else None  # (R, in)
        self.B = torch.cat([B for _, B in ups.values()], dim=1).contiguous() if ups else None  # (out, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.step
        if step.token_adapter is None or self.A is None:
            return y
        y = y.contiguous()
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): the packed tokens (an expert's: the rows routed to it)
        y2 = y.view(-1, y.shape[-1])  # (N, out), a view of y
        A, B = self.A, self.B
        assert B is not None
        sub = routed_rows()  # inside a mixture of experts' expert: its rows of the packed batch
        if step.single is not None:
            span = self.spans.get(step.single)
            if span is not None:
                r0, r1 = span
                y2.addmm_(x2 @ A[r0:r1].T, B[:, r0:r1].T)
        elif len(self.columns) <= x2.shape[1] // 2:
            mask = step.mask(self.columns, A.dtype)
            xa = (x2 @ A.T).mul_(mask if sub is None else mask[sub])  # (N, R), other adapters' columns zeroed
            y2.addmm_(xa, B.T)
        else:
            owner = step.token_adapter if sub is None else step.token_adapter[sub]
            for a, (r0, r1) in self.spans.items():
                rows = step.rows(a) if sub is None else (owner == a).nonzero().squeeze(1)
                if rows.numel():
                    y2.index_add_(0, rows, (x2.index_select(0, rows) @ A[r0:r1].T) @ B[:, r0:r1].T)
        return y


class LoraAdapters:
    """The adapters an engine serves: ``add(name, directory)``, ``remove(name)``, ``id_of(name)``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step = StepAdapters()
        self.ids: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self._next = itertools.count(1)  # ids are never reused: a prefix-cache block keeps its adapter's id
        self._wrapped: dict[str, MultiLoraLinear] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.ids

    def names(self) -> list[str]:
        return list(self.ids)

    def id_of(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.ids:
            have = ", ".join(self.ids) or "none"
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {have})")
        return self.ids[name]

    def add(self, name: str, directory: str | Path) -> int:
        """Load the PEFT LoRA adapter in ``directory`` under ``name``; returns its id. Nothing changes on error."""
        from ..peft.save_load import AdapterLoadError

        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits and _ . - only")
        if name in self.ids:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        config, tensors = _read(directory, self.model)
        if config.peft_type != "LORA":
            raise AdapterLoadError(f"{directory}: a {config.peft_type} adapter; only LoRA adapters can be served "
                                   "unmerged (merge others into the model with merge_and_unload)")
        updates = self._updates(config, tensors, str(directory))
        adapter = next(self._next)
        for path, update in updates.items():
            self._wrap(path).set_update(adapter, update)
        self.ids[name], self.sources[name] = adapter, str(directory)
        return adapter

    def remove(self, name: str) -> None:
        adapter = self.id_of(name)
        for layer in self._wrapped.values():
            if adapter in layer.updates:
                layer.set_update(adapter, None)
        del self.ids[name], self.sources[name]

    def _wrap(self, path: str) -> MultiLoraLinear:
        if path not in self._wrapped:
            parent, _, child = path.rpartition(".")
            owner = self.model.get_submodule(parent)
            self._wrapped[path] = MultiLoraLinear(getattr(owner, child), self.step)
            setattr(owner, child, self._wrapped[path])
        return self._wrapped[path]

    def _updates(self, config, tensors: dict, source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{live module path: (A stacked (R, in), B block-diagonal and scaled (out, R))}, every shape checked."""
        from ..peft.config import pattern_value
        from ..peft.save_load import AdapterLoadError

        parts: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # path → [(part, A, s·B)]
        tp = getattr(self.model, "tensor_parallel", None)
        for ours, state in tensors.items():
            A, B = state["lora_A.weight"], state["lora_B.weight"]
            r = A.shape[0]
            alpha = float(pattern_value(ours, config.alpha_pattern, config.lora_alpha))
            scale = alpha / (math.sqrt(r) if config.use_rslora else r)
            if tp is not None:  # this rank's slice: B's rows of a column-parallel layer, A's columns of a row-parallel one
                split = tp.spec(f"{ours}.weight", self.model.full_cfg)
                if split is not None and split.dim == 0:
                    B = split.of(B)
                elif split is not None:
                    A = split.of(A)
                    ours = f"{ours}.local"  # inside the all-reduce: the ranks' partial updates are summed with the base's
            path, part = self._target(ours)
            if path.endswith(".router"):
                raise AdapterLoadError(f"{source}: LoRA on {ours}: a mixture of experts' router is not served "
                                       "(its attention projections and experts are); merge the adapter instead")
            parts.setdefault(path, []).append((part, A, B * scale))
        out = {}
        p = next(self.model.parameters())
        for path, items in parts.items():
            module = self.model.get_submodule(path)
            base = module.base if isinstance(module, MultiLoraLinear) else module
            sizes = self._part_sizes(path, base)
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            R = sum(A.shape[0] for _, A, _ in items)
            A_cat = torch.cat([A for _, A, _ in items])  # (R, in)
            B_bd = torch.zeros(sum(sizes), R)  # (out, R)
            r0 = 0
            for part, A, B in items:
                if A.shape[1] != base.in_features or B.shape != (sizes[part], A.shape[0]):
                    raise AdapterLoadError(f"{source}: LoRA on {path} (part {part}) has A {tuple(A.shape)} and B "
                                           f"{tuple(B.shape)}; this model needs A (r, {base.in_features}) and "
                                           f"B ({sizes[part]}, r)")
                B_bd[offsets[part]:offsets[part] + sizes[part], r0:r0 + A.shape[0]] = B
                r0 += A.shape[0]
            out[path] = (A_cat.to(p.device, p.dtype).contiguous(), B_bd.to(p.device, p.dtype).contiguous())
        return out

    def _target(self, ours: str) -> tuple[str, int]:
        """attnkit module name (unfused) → (path of the live module that computes it, part of its output)."""
        parent, _, leaf = ours.rpartition(".")
        owner = self.model.get_submodule(parent)
        if leaf in _FUSED and not hasattr(owner, leaf):
            fused, part = _FUSED[leaf]
            return f"{parent}.{fused}", part
        return ours, 0

    def _part_sizes(self, path: str, base: nn.Module) -> list[int]:
        leaf = path.rpartition(".")[2]
        owner = self.model.get_submodule(path.rpartition(".")[0])
        if leaf == "qkv_proj":
            return [owner.n_heads * owner.head_dim, owner.n_kv_heads * owner.head_dim, owner.n_kv_heads * owner.head_dim]
        if leaf == "gate_up_proj":
            return [base.out_features // 2] * 2
        return [base.out_features]


def _read(directory: str | Path, model: nn.Module):
    """The adapter's config and tensors by attnkit (unfused) module name, read against a bodiless twin of
    ``model``: the served model's projections may be fused or quantized, the twin's are plain Linear layers."""
    from ..peft.save_load import read_adapter

    with torch.device("meta"):  # a tensor-parallel rank's twin is the whole model: the adapter is read whole, then sliced
        twin = type(model)(getattr(model, "full_cfg", model.cfg))
    return read_adapter(directory, twin)
