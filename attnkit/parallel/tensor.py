"""Tensor parallelism: each rank holds a slice of every layer and the slices meet in all-reduces.

Megatron-LM's split (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using
Model Parallelism", §3, fig. 3): in each block the projections that fan out are column-parallel and those that
fan back in are row-parallel, so one all-reduce closes each sublayer —

    attention:  rank r computes its heads:  Q_r = x·W_Qrᵀ, K_r, V_r (its query heads and their KV heads),
                o_r = Attention(Q_r, K_r, V_r)·W_Orᵀ  (W_O's columns of those heads);  o = Σ_r o_r  (all-reduce)
    FFN:        h_r = act(x·W_gate,rᵀ) ⊙ x·W_up,rᵀ  (its d_ff/N rows);   y = Σ_r h_r·W_down,rᵀ  (all-reduce)
    MoE:        every expert split as the FFN, the router whole on each rank: y = Σ_r Σ_e w_e·FFN_e,r(x)

and the vocabulary is split too (§3, "input embedding … parallelized along the vocabulary dimension"): rank r
holds rows r·V/N … (r+1)·V/N of the embedding (a token outside them looks up zeros; an all-reduce sums the one
row that is not) and of the output head (its logits gathered). A decode token therefore moves 2 all-reduces of
d_model values per layer, one of d_model for its embedding and a gather of the vocabulary's logits. A GGUF file's
quantized table is not split but viewed whole in the file's mapping on every rank (only the rows looked up are
ever read): then the embedding moves nothing.

:class:`TensorParallel` names a rank's place and its process group and counts what it communicates; its
:meth:`~TensorParallel.spec` says which slice of each of our parameters the rank holds, so the loaders
(:mod:`attnkit.loading`) read only that slice (a GGUF file's blocks sliced in place: a block never spans two rows,
and column slices fall on block boundaries); :meth:`~TensorParallel.parallelize` then closes the sublayers with
:class:`RowParallelLinear`, :class:`VocabParallelEmbedding` and :class:`VocabParallelHead`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .shm import PeerFailed

#: (our parameter, the dimension it is split along, what it is split by) — the rest is replicated on every rank
_SPLITS = [
    (re.compile(r"layers\.\d+\.self_attn\.q_proj\.(weight|bias)"), 0, "q"),
    (re.compile(r"layers\.\d+\.self_attn\.(k|v)_proj\.(weight|bias)"), 0, "kv"),
    (re.compile(r"layers\.\d+\.self_attn\.o_proj\.weight"), 1, "q"),
    (re.compile(r"layers\.\d+\.ffn\.(gate|up)_proj\.(weight|bias)"), 0, "ff"),
    (re.compile(r"layers\.\d+\.ffn\.down_proj\.weight"), 1, "ff"),
    (re.compile(r"layers\.\d+\.ffn\.experts\.\d+\.(gate|up)_proj\.(weight|bias)"), 0, "moe_ff"),
    (re.compile(r"layers\.\d+\.ffn\.experts\.\d+\.down_proj\.weight"), 1, "moe_ff"),
    (re.compile(r"(tok_embeddings|lm_head)\.weight"), 0, "vocab"),
]


class TensorParallelError(RuntimeError):
    """A collective failed: another rank stopped, or did not answer within the group's timeout."""


@dataclass(frozen=True)
class Split:
    """Rows (``dim`` 0) or columns (``dim`` 1) ``start`` … ``stop`` of a parameter; ``size``: its full extent there
    (a vocabulary not divisible by the ranks is padded: rows past ``size`` are zeros)."""

    dim: int
    start: int
    stop: int
    size: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor ``t`` (zero rows where it pads the vocabulary)."""
        part = t.narrow(self.dim, self.start, max(0, min(self.stop, self.size) - self.start))
        pad = self.stop - self.start - part.shape[self.dim]
        if pad:
            shape = list(part.shape)
            shape[self.dim] = pad
            part = torch.cat([part, part.new_zeros(shape)], dim=self.dim)
        return part.contiguous()


@dataclass
class TensorParallel:
    """Rank ``rank`` of ``world`` ranks in ``group`` (None: the default group), and its communication counters."""

    rank: int
    world: int
    group: Any = None
    device: str = "cpu"  # where the collectives' tensors live (cuda: NCCL)
    bytes_reduced: int = 0  # payload bytes this rank put into all-reduces and all-gathers
    num_collectives: int = 0
    comm_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # collectives by kind (all_reduce, all_gather)
    workers: Any = None  # the worker processes rank 0 spawned (attnkit.parallel.launch.spawn_workers)
    shm: Any = None  # ranks of one machine: collectives through shared memory (attnkit.parallel.shm), else gloo

    # -- which slice of each parameter this rank holds -------------------------------------------------
    def check(self, cfg: Any) -> None:
        """Refuse, by name, a model this split cannot cut evenly or a feature it does not implement."""
        w = self.world
        problems = []
        if getattr(cfg, "n_experts", 0) and self._moe_ff(cfg) % w:
            problems.append(f"the experts' d_ff {self._moe_ff(cfg)} is not divisible by {w} ranks")
        if getattr(cfg, "qk_norm", None) == "full":
            problems.append("q/k RMSNorm over the whole projection (OLMoE) spans every head")
        if cfg.n_kv_heads % w:
            problems.append(f"n_kv_heads {cfg.n_kv_heads} is not divisible by {w} ranks")
        if cfg.n_heads % w:
            problems.append(f"n_heads {cfg.n_heads} is not divisible by {w} ranks")
        if not getattr(cfg, "n_experts", 0) and cfg.d_ff % w:
            problems.append(f"d_ff {cfg.d_ff} is not divisible by {w} ranks")
        if problems:
            raise ValueError(f"tensor parallelism over {w} ranks: " + "; ".join(problems))

    def local_config(self, cfg: Any) -> Any:
        """The config of this rank's slice: its heads, its d_ff/N and its V/N (rounded up) vocabulary rows."""
        self.check(cfg)
        w = self.world
        moe = {"moe_d_ff": self._moe_ff(cfg) // w} if getattr(cfg, "n_experts", 0) else {}
        return replace(cfg, n_heads=cfg.n_heads // w, n_kv_heads=cfg.n_kv_heads // w, d_ff=cfg.d_ff // w,
                       vocab_size=-(-cfg.vocab_size // w), head_dim=cfg.hd, **moe)

    @staticmethod
    def _moe_ff(cfg: Any) -> int:
        return cfg.moe_d_ff or cfg.d_ff

    def spec(self, name: str, cfg: Any) -> Split | None:
        """The slice of our parameter ``name`` (of the full model ``cfg``) this rank holds; None: all of it."""
        for pattern, dim, by in _SPLITS:
            if pattern.fullmatch(name):
                full = {"q": cfg.n_heads * cfg.hd, "kv": cfg.n_kv_heads * cfg.hd, "ff": cfg.d_ff,
                        "moe_ff": self._moe_ff(cfg) if getattr(cfg, "n_experts", 0) else 0,
                        "vocab": cfg.vocab_size}[by]
                n = -(-full // self.world)
                return Split(dim, self.rank * n, (self.rank + 1) * n, full)
        return None

    def shard_plan(self, plan: dict[str, tuple[str, Any]], cfg: Any) -> dict[str, tuple[str, Any]]:
        """A loader plan (our name → (source, loader of the full tensor)) whose loaders return this rank's slices."""
        out = {}
        for ours, (src, load) in plan.items():
            s = self.spec(ours, cfg)
            out[ours] = (src, load if s is None else (lambda load=load, s=s: s.of(load())))
        return out

    # -- the sublayers closed by collectives ---------------------------------------------------------------
    def parallelize(self, model: nn.Module, cfg: Any) -> nn.Module:
        """Close this rank's slices (``model`` built from :meth:`local_config`) into the full model's function:
        row-parallel o/down projections, a vocabulary-parallel embedding and head. ``model.cfg`` becomes the
        engine's view: this rank's heads and d_ff, the full vocabulary."""
        for layer in model.layers:
            attn, ffn = layer.self_attn, layer.ffn
            attn.o_proj = RowParallelLinear(attn.o_proj, self)
            if hasattr(ffn, "experts"):  # Σ_e w_e·FFN_e(x) is linear in each expert's down projection: one sum
                layer.ffn = ReducedSum(ffn, self)
            else:
                ffn.down_proj = RowParallelLinear(ffn.down_proj, self)
        emb = model.tok_embeddings
        if emb.num_embeddings != cfg.vocab_size:  # else the whole table, viewed in a GGUF file's pages (the loader)
            model.tok_embeddings = VocabParallelEmbedding(emb, self, cfg.vocab_size)
        head = model.output_head
        if head is None:
            head = TiedHead(emb) if model.lm_head is None else model.lm_head
        model.output_head, model.lm_head = VocabParallelHead(head, self, cfg.vocab_size), None
        model.cfg = replace(model.cfg, vocab_size=cfg.vocab_size)
        model.full_cfg = cfg  # the whole model's (a LoRA adapter is read against it, then sliced: attnkit.engine.lora)
        model.tensor_parallel = self
        return model

    # -- collectives, counted and timed ------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``x`` (summed in float32: gloo has no bfloat16 sum and the partial sums keep their bits;
        through shared memory in rank order, the same bits on every rank)."""
        y = x.float().contiguous()

        def add(parts: list[torch.Tensor]) -> torch.Tensor:
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return out

        got = self._shared("all_reduce", y, add)
        if got is None:
            self._collective("all_reduce", y.numel() * y.element_size(), lambda: dist.all_reduce(y, group=self.group))
            got = y
        return got.to(x.dtype)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order."""
        x = x.contiguous()
        got = self._shared("all_gather", x, lambda parts: torch.cat(parts, dim=-1))
        if got is not None:
            return got
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._collective("all_gather", x.numel() * x.element_size(), lambda: dist.all_gather(parts, x, group=self.group))
        return torch.cat(parts, dim=-1)

    def _shared(self, kind: str, x: torch.Tensor, combine: Any) -> torch.Tensor | None:
        """``combine`` of every rank's ``x`` exchanged through shared memory (None: no exchange, or too large)."""
        if self.shm is None or x.device.type != "cpu":
            return None
        t0 = time.perf_counter()
        try:
            parts = self.shm.exchange(x.view(-1).view(torch.uint8))
        except PeerFailed as e:
            raise TensorParallelError(f"tensor-parallel rank {self.rank}/{self.world}: {kind} failed — {e}") from e
        if parts is None:
            return None
        out = combine([p.view(x.dtype).view(x.shape) for p in parts])  # copied out before the next exchange
        self._count(kind, x.numel() * x.element_size(), time.perf_counter() - t0)
        return out

    def _collective(self, kind: str, nbytes: int, op: Any) -> None:
        t0 = time.perf_counter()
        try:
            op()
        except RuntimeError as e:  # gloo: a peer's connection closed, or the group's timeout passed
            raise TensorParallelError(f"tensor-parallel rank {self.rank}/{self.world}: {kind} failed — another rank "
                                      f"stopped or did not answer in time ({e})") from e
        self._count(kind, nbytes, time.perf_counter() - t0)

    def _count(self, kind: str, nbytes: int, seconds: float) -> None:
        self.comm_seconds += seconds
        self.bytes_reduced += nbytes
        self.num_collectives += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def reset_counters(self) -> None:
        self.bytes_reduced, self.num_collectives, self.comm_seconds, self.counts = 0, 0, 0.0, {}


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r·W_rᵀ + b: this rank's input columns of a row-parallel projection, then one all-reduce; the
    bias (whole, on every rank) is added once, after the sum."""

    def __init__(self, local: nn.Module, tp: TensorParallel) -> None:
        super().__init__()
        bias = getattr(local, "bias", None)
        if bias is not None:
            local.bias = None  # type: ignore[assignment]
        self.local, self.tp = local, tp
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features = local.in_features * tp.world  # type: ignore[operator]
        self.out_features = local.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.local(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank {self.tp.rank}/{self.tp.world}: input columns {self.local.in_features} of {self.in_features}"


class ReducedSum(nn.Module):
    """y = Σ_r f_r(x): a sublayer whose output is linear in its row-parallel projections (a mixture of experts:
    every expert's d_ff split across the ranks, the router whole on each) closed by one all-reduce."""

    def __init__(self, local: nn.Module, tp: TensorParallel) -> None:
        super().__init__()
        self.local, self.tp = local, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.local(x))


class VocabParallelEmbedding(nn.Module):
    """E[x] with E split by rows: each rank looks up the tokens in its rows (zeros for the others), summed."""

    def __init__(self, local: nn.Module, tp: TensorParallel, vocab_size: int) -> None:
        super().__init__()
        self.local, self.tp, self.vocab_size = local, tp, vocab_size
        self.rows = local.num_embeddings  # type: ignore[assignment]
        self.start = tp.rank * self.rows
        self.num_embeddings, self.embedding_dim = vocab_size, local.embedding_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise IndexError(f"token id out of range for a vocabulary of {self.vocab_size}")
        mine = (idx >= self.start) & (idx < self.start + self.rows)
        x = self.local(torch.where(mine, idx - self.start, 0))  # (…, d)
        return self.tp.all_reduce(x * mine[..., None].to(x.dtype))

    @property
    def weight(self) -> torch.Tensor:  # this rank's rows (code reading the table sees that it is sliced)
        return self.local.weight


class TiedHead(nn.Module):
    """logits_r = x·E_rᵀ: a tied output head over this rank's embedding rows."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = [embedding]  # shared, not a submodule: its rows are the embedding's
        self.out_features = embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding[0].weight)


class VocabParallelHead(nn.Module):
    """logits = [x·W_0ᵀ | … | x·W_{N−1}ᵀ][:V]: each rank's vocabulary rows, gathered (padding rows dropped)."""

    def __init__(self, local: nn.Module, tp: TensorParallel, vocab_size: int) -> None:
        super().__init__()
        self.local, self.tp, self.vocab_size = local, tp, vocab_size
        self.out_features = vocab_size
        self.in_features = getattr(local, "in_features", None)
        if hasattr(local, "dense_for_prompts"):
            self.dense_for_prompts = local.dense_for_prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(self.local(x))[..., :self.vocab_size]
