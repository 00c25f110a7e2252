"""Sequential decoding for encoder–decoder models: greedy and beam search.

Inference is autoregressive (Vaswani et al. 2017, §3: "at each step the model is auto-regressive,
consuming the previously generated symbols as additional input"): n output tokens need n decoder
passes. With ``use_cache`` each pass feeds only the newest token and reuses the keys/values of the
earlier ones (:class:`attnkit.nn.DecoderCache`); the encoder's K/V for cross-attention are
projected once per source.

Beam search ranks finished hypotheses by log P(y|x) / lp(y) with the GNMT length penalty
lp(y) = ((5 + |y|) / 6)^α (Wu et al. 2016, eq. 14); α = 0 ranks by log-probability alone.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..nn import DecoderCache


class EncoderDecoder(Protocol):
    config: object

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor,
               cache: DecoderCache | None = None) -> torch.Tensor: ...
    def init_cache(self, memory: torch.Tensor) -> DecoderCache: ...


def _ids(model: EncoderDecoder) -> tuple[int, int, int]:
    cfg = model.config
    return cfg.pad_id, cfg.bos_id, cfg.eos_id  # type: ignore[attr-defined]


def _max_len(model: EncoderDecoder, src: torch.Tensor, max_len: int | None) -> int:
    if max_len is None:
        max_len = 2 * src.shape[1] + 10
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return max_len


@torch.no_grad()
def greedy_decode(model: EncoderDecoder, src: torch.Tensor, max_len: int | None = None,
                  use_cache: bool = True) -> torch.Tensor:
    """argmax decoding. src: (B, S) → ids (B, ≤ max_len) without <bos>; <pad> after each <eos>."""
    pad, bos, eos = _ids(model)
    max_len = _max_len(model, src, max_len)
    memory, src_mask = model.encode(src)
    B = src.shape[0]
    ys = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    cache = model.init_cache(memory) if use_cache else None
    for _ in range(max_len):
        if cache is not None:
            logits = model.decode(ys[:, -1:], memory, src_mask, cache=cache)[:, -1]  # (B, V): one new token
        else:
            logits = model.decode(ys, memory, src_mask)[:, -1]  # recompute the whole prefix
        nxt = logits.argmax(-1).masked_fill(finished, pad)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        finished |= nxt == eos
        if bool(finished.all()):
            break
    return ys[:, 1:]


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: EncoderDecoder, src: torch.Tensor, beam_size: int = 4, max_len: int | None = None,
                alpha: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched beam search with the decoder cache. Returns (ids (B, T), normalised scores (B,)).

    A finished hypothesis stays in its beam and is extended only by <pad> at no cost, so its
    score is frozen; at the end every hypothesis is ranked by score / lp(length).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be ≥ 1, got {beam_size}")
    pad, bos, eos = _ids(model)
    max_len = _max_len(model, src, max_len)
    B, K, dev = src.shape[0], beam_size, src.device
    memory, src_mask = model.encode(src)
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)  # (B·K, S, d)
    cache = model.init_cache(memory)

    ys = torch.full((B * K, 1), bos, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B * K, dtype=torch.long, device=dev)
    for _ in range(max_len):
        logp = torch.log_softmax(model.decode(ys[:, -1:], memory, src_mask, cache=cache)[:, -1].float(), -1)
        V = logp.shape[-1]
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, pad] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)  # (B·K, V)
        cand = scores[:, :, None] + logp.view(B, K, V)  # (B, K, V)
        scores, flat = cand.view(B, K * V).topk(K, dim=-1)  # (B, K)
        beam, tok = flat // V, flat % V
        reorder = (torch.arange(B, device=dev)[:, None] * K + beam).view(-1)
        cache.reorder(reorder)
        tok = tok.view(-1)
        was_finished = finished[reorder]
        lengths = lengths[reorder] + (~was_finished).long()
        finished = was_finished | (tok == eos)
        ys = torch.cat([ys[reorder], tok[:, None]], dim=1)
        if bool(finished.all()):
            break
    normalised = scores.view(-1) / length_penalty(lengths, alpha)
    best = normalised.view(B, K).argmax(-1)  # (B,)
    rows = torch.arange(B, device=dev) * K + best
    return ys[rows, 1:], normalised.view(B, K).gather(1, best[:, None]).squeeze(1)
