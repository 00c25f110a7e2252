"""Evaluation helpers: perplexity over a shipped public-domain text; KL divergence and greedy agreement between two models."""

from .perplexity import (Agreement, Divergence, Perplexity, divergence, greedy_agreement, greedy_tokens, perplexity,
                         shipped_text)

__all__ = ["Agreement", "Divergence", "Perplexity", "divergence", "greedy_agreement", "greedy_tokens", "perplexity",
           "shipped_text"]
