"""Attention masks.

Convention used everywhere in attnkit: a mask is a **boolean tensor where True means "may
attend"**, broadcastable to the score shape ``(B, n_heads, T_q, T_k)``. Masked scores are set to
−inf before the softmax (Vaswani et al. 2017, §3.2.3: "masking out (setting to −∞) all values in
the input of the softmax which correspond to illegal connections"). A row whose keys are all
masked yields zeros, never NaN (see :func:`attnkit.nn.attention.scaled_dot_product_attention`).

Note that this is the opposite of ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` (True =
ignore); :func:`from_key_padding_mask` converts.
"""

from __future__ import annotations

import torch


def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Look-ahead mask: query i may attend to key j iff j ≤ i + (k_len − q_len).

    With a KV cache the queries are the *last* ``q_len`` positions of a sequence of ``k_len``
    keys, so the diagonal is shifted by ``k_len − q_len``. Returns ``(q_len, k_len)`` bool.
    """
    k_len = q_len if k_len is None else k_len
    if q_len > k_len:
        raise ValueError(f"causal_mask: q_len ({q_len}) cannot exceed k_len ({k_len})")
    i = torch.arange(q_len, device=device).unsqueeze(1)  # (T_q, 1)
    j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, T_k)
    return j <= i + (k_len - q_len)


def padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Key-padding mask from token ids ``(B, T)``: ``(B, 1, 1, T)``, False on padding keys."""
    if tokens.dim() != 2:
        raise ValueError(f"padding_mask expects token ids of shape (B, T), got {tuple(tokens.shape)}")
    return (tokens != pad_id)[:, None, None, :]


def lengths_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Key-padding mask from sequence lengths ``(B,)``: ``(B, 1, 1, max_len)``."""
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def from_key_padding_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Convert torch's ``key_padding_mask`` ``(B, T)`` (True = ignore) to ours ``(B, 1, 1, T)``."""
    return (~key_padding_mask.bool())[:, None, None, :]


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of broadcastable masks; ``None`` entries mean "no restriction"."""
    out: torch.Tensor | None = None
    for m in masks:
        if m is None:
            continue
        if m.dtype != torch.bool:
            raise TypeError(f"masks must be bool tensors (True = may attend), got dtype {m.dtype}")
        out = m if out is None else out & m
    return out


def self_attention_mask(tokens: torch.Tensor, pad_id: int, causal: bool) -> torch.Tensor:
    """Mask for self-attention over ``tokens (B, T)``: key padding, AND look-ahead if ``causal``.

    Returns ``(B, 1, T, T)`` (or ``(B, 1, 1, T)`` when not causal).
    """
    pad = padding_mask(tokens, pad_id)
    if not causal:
        return pad
    return combine_masks(pad, causal_mask(tokens.shape[1], device=tokens.device)[None, None])


def cross_attention_mask(src_tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Encoder–decoder attention mask: every target query sees every non-pad source key.

    Returns ``(B, 1, 1, T_src)``; it broadcasts over target positions.
    """
    return padding_mask(src_tokens, pad_id)
