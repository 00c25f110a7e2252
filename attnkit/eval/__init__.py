"""Evaluation helpers: perplexity over a shipped public-domain text, greedy agreement between two models."""

from .perplexity import Agreement, Perplexity, greedy_agreement, greedy_tokens, perplexity, shipped_text

__all__ = ["Agreement", "Perplexity", "greedy_agreement", "greedy_tokens", "perplexity", "shipped_text"]
