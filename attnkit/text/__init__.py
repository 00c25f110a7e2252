"""Text ↔ tokens: tokenizers, chat templates and streaming detokenisation."""
