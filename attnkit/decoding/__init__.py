"""Sequential decoding: greedy and beam search over an encoder–decoder with a KV cache (``search``), and the
single-stream reference decoder of decoder-only models with its sampling rules (``generate``)."""

from .search import beam_search, greedy_decode, length_penalty

__all__ = ["beam_search", "greedy_decode", "length_penalty"]
