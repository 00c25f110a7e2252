"""Evaluation helpers: perplexity over a shipped public-domain text (``attnkit perplexity``: llama-perplexity's chunks,
through the engine); KL divergence and greedy agreement between two models."""

from .perplexity import (Agreement, ChunkedDivergence, Divergence, Perplexity, chunked_divergence, chunked_perplexity,
                         divergence, engine_perplexity, greedy_agreement, greedy_tokens, perplexity, shipped_text)

__all__ = ["Agreement", "ChunkedDivergence", "Divergence", "Perplexity", "chunked_divergence", "chunked_perplexity",
           "divergence", "engine_perplexity", "greedy_agreement", "greedy_tokens", "perplexity", "shipped_text"]
