"""Next-token cross-entropy without the (B, T, vocab) logits tensor (as Liger-Kernel's fused linear cross-entropy
and Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").

    L = −Σ_t log softmax(head(norm(h_t)))[y_{t+1}]   over the positions t whose label is not −100

Only labelled positions reach the head (a prompt's tokens cost no logits), a chunk of rows at a time, so the
float32 logits and their softmax — 1024 tokens × a 128k vocabulary = 0.5 GB each — never exist for a whole batch.
Where the head is frozen (LoRA and the other adapters; the tied embedding of most models) each chunk's
∂L/∂h is computed right after its loss, in the forward, and only that (N, d) gradient is kept: the head's two
products (logits, and ∂L/∂h = ∂L/∂logits · W) run once each, and between them the loss and ∂L/∂logits come from
the C kernel's two passes over each row (kernels/cross_entropy.c), written over the logits. Where the head trains, each chunk's logits are
recomputed in the backward instead (activation checkpointing: three products).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.scratch import release, reused
from .sft_data import IGNORE

CHUNK_ELEMS = 1 << 24  # logits per chunk (64 MiB of float32)

Head = Callable[[torch.Tensor], torch.Tensor]


class FrozenHead:
    """A frozen plain head: logits = W·norm(h), W the head's weight (cast once to the autocast dtype where training
    runs under one). The loss takes its two parts apart: the norm through autograd, the two products with W into
    reused buffers."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor) -> None:
        self.norm, self.weight = norm, weight

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self.weight)


_CASTS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(w) → (w held weakly, its version, its cast)


def _cast_once(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, kept while ``w`` lives and is not changed (its version): a frozen head's cast is made once
    for a whole run instead of once a batch (28M weights of the default model, page faults of 56 MB included)."""
    for key in [k for k, (ref, _, _) in _CASTS.items() if ref() is None]:
        del _CASTS[key]
    held = _CASTS.get(id(w))
    if held is None or held[0]() is not w or held[1] != w._version or held[2].dtype != dtype:
        held = (weakref.ref(w), w._version, w.detach().to(dtype))
        _CASTS[id(w)] = held
    return held[2]


def hidden_head(model: nn.Module) -> tuple[Head, int] | None:
    """(the base model's head: final norm → LM head, its vocabulary size) where its forward can return the last
    hidden states instead of logits (``hidden_only``); None where it cannot (the loss takes the logits).

    A frozen float head (LoRA and the other adapters) is a :class:`FrozenHead`; under CPU autocast its weight is
    cast to the autocast dtype once (autocast caches the casts of trainable weights only, and cast the (vocab × d)
    weight again for each chunk: 112 of a step's ~1,500 ms for the default model's 49,152 × 576 head in three chunks,
    session 27). Any other head runs as the model's ``logits`` runs it."""
    base = getattr(model, "base_model", model)  # a PeftModel's base
    if not hasattr(base, "logits") or "hidden_only" not in inspect.signature(base.forward).parameters:
        return None
    vocab = int(base.cfg.vocab_size)
    parts = base.head_parts() if hasattr(base, "head_parts") else None
    if parts is not None and parts[1].dtype == torch.float32 and not parts[1].requires_grad \
            and not any(p.requires_grad for p in parts[0].parameters()):
        norm, w = parts
        if torch.is_autocast_enabled("cpu") and w.device.type == "cpu":
            w = _cast_once(w, torch.get_autocast_dtype("cpu"))
        return FrozenHead(norm, w), vocab
    return base.logits, vocab


def release_buffers() -> None:
    """Drop the loss's reused buffers and cached head casts (the end of a run)."""
    release("loss.")
    _CASTS.clear()


def _frozen_chunk(head: FrozenHead, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, lib) -> torch.Tensor:
    """One chunk's summed loss, ∂L/∂h written into ``grad``: x = norm(h) through autograd; z = x·Wᵀ, the loss and
    ∂L/∂z (in place, kernels/cross_entropy.c) and ∂L/∂x = ∂L/∂z·W in reused buffers; then ∂L/∂h by autograd."""
    n, (vocab, d) = len(y), head.weight.shape
    with torch.enable_grad():
        hc = h.detach().requires_grad_(True)
        x = head.norm(hc)  # (n, d): bf16 under autocast, as F.linear would take it
    w = head.weight
    xd = x.detach() if x.dtype == w.dtype else x.detach().to(w.dtype)
    z = torch.mm(xd, w.t(), out=reused("loss.logits", (n, vocab), w.dtype))  # (not mapped afresh each chunk)
    loss = _c_loss(lib, z, y, grad_over_z=True)
    gx = torch.mm(z, w, out=reused("loss.grad_x", (n, d), w.dtype))
    grad.copy_(torch.autograd.grad(x, hc, gx.to(x.dtype))[0])
    return loss.sum()


def _head_chunk(head: Head, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, bufs: dict) -> torch.Tensor:
    """One chunk's summed loss through the head as the model runs it, ∂L/∂h written into ``grad``: the loss and
    ∂L/∂z = softmax(z) − onehot(y) by the C kernel over the logits in place, else by PyTorch's ops in float32 in
    place (autograd's log-softmax would allocate its output, a zeroed gradient and its own result, each (n, vocab))."""
    n = len(y)
    with torch.enable_grad():
        hc = h.detach().requires_grad_(True)
        z = head(hc)  # (n, vocab): bfloat16 under autocast
    zd = z.detach()
    if (lib := _loss_kernels(z)) is not None:
        loss = _c_loss(lib, zd, y, grad_over_z=True)
        grad.copy_(torch.autograd.grad(z, hc, zd)[0])
        return loss.sum()
    if "p" not in bufs:
        bufs["p"] = torch.empty(n, z.shape[1], dtype=torch.float32)  # the first chunk is the largest
        bufs["g"] = bufs["p"] if z.dtype == torch.float32 else torch.empty(bufs["p"].shape, dtype=z.dtype)
    p = bufs["p"][:n].copy_(zd)
    zy = p.gather(1, y[:, None])  # (n, 1)
    m = p.amax(-1, keepdim=True)
    s = p.sub_(m).exp_().sum(-1, keepdim=True)
    p.div_(s)
    p[torch.arange(n), y] -= 1.0
    gz = bufs["g"][:n].copy_(p) if bufs["g"] is not bufs["p"] else p
    grad.copy_(torch.autograd.grad(z, hc, gz)[0])
    return (m + s.log() - zy).sum()


def _loss_kernels(z: torch.Tensor):
    """The C kernels where they take a chunk's logits (kernels/cross_entropy.c: a CPU, contiguous bf16 or float32),
    else None (PyTorch's ops)."""
    if z.device.type != "cpu" or z.dtype not in (torch.bfloat16, torch.float32) or not z.is_contiguous() or not C_LOSS:
        return None
    from ..kernels import library

    return library()


def _c_loss(lib, z: torch.Tensor, y: torch.Tensor, grad_over_z: bool) -> torch.Tensor:
    """Each row's loss lse(z) − z[y] by the C kernel (z (n, vocab) contiguous bf16 or float32); with ``grad_over_z``
    ∂L/∂z = softmax(z) − onehot(y) written over z. A label outside the vocabulary raises IndexError."""
    loss = torch.empty(len(y))
    if lib.ak_cross_entropy(z.data_ptr(), y.data_ptr(), len(y), z.shape[-1], int(z.dtype == torch.bfloat16),
                            loss.data_ptr(), z.data_ptr() if grad_over_z else None, torch.get_num_threads()):
        raise IndexError(f"a label is outside the vocabulary of {z.shape[-1]}")
    return loss


C_LOSS = True  # the C kernel where it takes the chunk (False: PyTorch's ops, as where there is no compiler)


def _chunk_loss(head: Head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = head(h)
    if not torch.is_grad_enabled() and (lib := _loss_kernels(z)) is not None:  # an evaluation: one pass in C, where
        return _c_loss(lib, z, y, grad_over_z=False).sum()  # F.cross_entropy would copy z to float32 and log-softmax it
    return F.cross_entropy(z.float(), y, reduction="sum")


def head_is_frozen(model: nn.Module) -> bool:
    """No parameter of the final norm, the LM head or the (tied) embedding of ``model``'s base trains."""
    base = getattr(model, "base_model", model)
    parts = [getattr(base, n, None) for n in ("norm", "output_head", "lm_head", "tok_embeddings")]
    return not any(p.requires_grad for m in parts if isinstance(m, nn.Module) for p in m.parameters())


class _LossWithGrad(torch.autograd.Function):
    """Σ of the chunks' losses, with ∂(Σ)/∂h computed chunk by chunk in the forward (Liger-Kernel's fused linear
    cross-entropy); the backward only scales it. Only for a frozen head: its parameters get no gradient here."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, head: Head, rows: int) -> torch.Tensor:  # type: ignore[override]
        grad = torch.empty_like(h)  # (N, d)
        total = torch.zeros((), dtype=torch.float32)
        bufs: dict[str, torch.Tensor] = {}  # PyTorch's path: one float32 softmax buffer, one gradient in z's dtype
        for i in range(0, len(y), rows):
            hc, yc, part = h[i:i + rows], y[i:i + rows], grad[i:i + rows]
            if isinstance(head, FrozenHead) and (lib := _loss_kernels(head.weight)) is not None:  # its logits' dtype
                total += _frozen_chunk(head, hc, yc, part, lib)
            else:
                total += _head_chunk(head, hc, yc, part, bufs)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def chunked_lm_loss(head: Head, vocab: int, hidden: torch.Tensor, labels: torch.Tensor,
                    reduction: str = "mean", frozen_head: bool = False) -> torch.Tensor:
    """The loss of :func:`attnkit.train.finetune.lm_loss` from the hidden states (B, T, d) before the final norm.
    ``frozen_head`` (:func:`head_is_frozen`): the gradient is made in the forward (the head gets none)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T−1), d): position t predicts label t+1
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # (N, d), (N,)
    rows = max(1, CHUNK_ELEMS // vocab)
    training = torch.is_grad_enabled() and h.requires_grad
    if training and frozen_head and len(y):
        total = _LossWithGrad.apply(h, y, head, rows)
        return total / len(y) if reduction == "mean" else total
    total = hidden.new_zeros((), dtype=torch.float32) + 0 * hidden.sum()  # 0 with a graph when nothing is labelled
    for i in range(0, len(y), rows):
        hc, yc = h[i:i + rows], y[i:i + rows]
        total = total + (checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False) if training
                         else _chunk_loss(head, hc, yc))
    return total / max(len(y), 1) if reduction == "mean" else total
