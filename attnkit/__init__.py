"""attnkit: the Transformer from first principles, up to an inference engine and PEFT."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from attnkit import LLM, SamplingParams`` without importing torch for ``import attnkit``."""
    if name in ("LLM", "SamplingParams", "LLMEngine", "EngineConfig", "AsyncLLMEngine"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
