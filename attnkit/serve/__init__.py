"""An OpenAI-compatible HTTP server on the inference engine (``attnkit serve``).

One idea per file: :mod:`.protocol` (request bodies), :mod:`.errors` (OpenAI-shaped errors),
:mod:`.metrics` (Prometheus), :mod:`.generation` (sampling settings, prompt checks, engine streams),
:mod:`.structured` (response_format and vLLM's guided fields → the engine's grammars),
:mod:`.tools` and :mod:`.tool_parsers` (tool calling: rendering, forced choices, the families' call formats),
:mod:`.formatting` (JSON bodies and server-sent events), :mod:`.completions`, :mod:`.chat`, :mod:`.responses`,
:mod:`.embeddings` (the routes), :mod:`.state` (what the routes share), :mod:`.app` (``build_app``),
:mod:`.cli` (``attnkit serve``).
"""

from .app import build_app

__all__ = ["build_app"]
