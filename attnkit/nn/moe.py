"""Sparse mixture of experts: the feed-forward sublayer of Mixtral, Qwen3-MoE and OLMoE.

    p = softmax(x·W_r)                       router probabilities over E experts   (Shazeer et al. 2017)
    S = TopK(p, k)                           the k experts each token is sent to
    w_e = p_e / Σ_{j∈S} p_j  (norm_topk_prob) or p_e (OLMoE)
    y = Σ_{e∈S} w_e · FFN_e(x),  FFN_e(x) = (act(x·W_gate,e) ⊙ x·W_up,e)·W_down,e

Mixtral (Jiang et al. 2024, "Mixtral of Experts", eq. 1–2) takes the softmax over the k chosen logits,
which is the renormalised form above. Only the chosen experts run, each once on all the tokens routed to
it (tokens grouped by expert), so a step reads only the weights of the experts it uses.

The module's contract (the GGUF loader and the C decode step rely on it): ``router`` is an ``nn.Linear``
(E outputs, no bias; float32 unless the model was loaded in another dtype) or a ``GGUFBlockLinear`` (the file's
blocks); ``top_k``, ``n_experts``, ``norm_topk_prob``; ``experts[e]`` a :class:`~attnkit.nn.ffn.SwiGLU` whose
``gate_proj``, ``up_proj``, ``down_proj`` are ``GGUFBlockLinear`` on the quantized GGUF path (expert e's rows
of the file's stacked tensor), and ``gate_up_proj`` instead of gate/up once fused (``SwiGLU.fuse``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .ffn import SwiGLU

RowsFn = Callable[["SparseMoE", torch.Tensor], "torch.Tensor | None"]
_ROWS_BY: ContextVar[RowsFn | None] = ContextVar("moe_rows_by", default=None)
_ROUTED: ContextVar[torch.Tensor | None] = ContextVar("moe_routed_rows", default=None)


def routed_rows() -> torch.Tensor | None:
    """While an expert runs: which rows of its layer's input (N, d) it was given, in order (None outside one). A
    wrapper that knows each input row's owner — the engine's per-request LoRA adapters — reads it there."""
    return _ROUTED.get()


@contextmanager
def _routed(rows: torch.Tensor) -> Iterator[None]:
    token = _ROUTED.set(rows)
    try:
        yield
    finally:
        _ROUTED.reset(token)


@contextmanager
def moe_rows_by(fn: RowsFn | None) -> Iterator[None]:
    """Within the block, every SparseMoE computes its rows by ``fn(layer, x (N, d))`` where that returns a tensor
    (None: the layer's own grouped products). The engine runs its prompt rows through the C decode step's MoE this
    way (attnkit.engine.native_decode), so that a prompt's experts are one parallel C call per layer instead of a
    Python loop over the experts."""
    token = _ROWS_BY.set(fn)
    try:
        yield
    finally:
        _ROWS_BY.reset(token)


class SparseMoE(nn.Module):
    """``n_experts`` gated FFNs (``experts.<e>.gate_proj/up_proj/down_proj``) under a top-k ``router``."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_ff: int, activation: str = "silu",
                 norm_topk_prob: bool = True, bias: bool = False) -> None:
        super().__init__()
        if not 0 < top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts ({n_experts}), got {top_k}")
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff, activation, bias=bias) for _ in range(n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) → the chosen experts (N, k) and their weights (N, k) float32."""
        w = getattr(self.router, "weight", None)  # a float router computes in its own dtype (float32 as a rule)
        cast = isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != x.dtype
        logits = self.router(x.to(w.dtype) if cast else x)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) → (..., d)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        by = _ROWS_BY.get()
        out = by(self, x) if by is not None else None
        if out is not None:
            return out.view(shape)
        chosen, weights = self.route(x)
        weights = weights.to(x.dtype)
        out = self._one(x, chosen, weights) if x.shape[0] == 1 else self._grouped(x, chosen, weights)
        return out.view(shape)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once, on all its tokens (one matrix product per projection, not one per token);
        each token's outputs summed in the order of the expert ids."""
        flat = chosen.flatten()  # (N·k,)
        order = flat.argsort(stable=True)  # assignments grouped by expert, tokens in order within each
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token = order // self.top_k  # the token of each grouped assignment
        w = weights.flatten()[order][:, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token[start:start + n]
                with _routed(rows):
                    y = self.experts[e](x[rows])
                out.index_add_(0, rows, y * w[start:start + n])
                start += n
        return out

    def _one(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token (a decode step): its k experts in turn, without the grouping's sort and scatter — the same
        operations in the same order as :meth:`_grouped`, so the same bits."""
        ids = chosen[0].tolist()
        out = torch.zeros_like(x)
        with _routed(torch.zeros(1, dtype=torch.long, device=x.device)):
            for j in sorted(range(self.top_k), key=ids.__getitem__):
                out += self.experts[ids[j]](x) * weights[0, j]
        return out

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"
