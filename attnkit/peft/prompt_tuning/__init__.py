from .config import PromptTuningConfig
from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig"]
