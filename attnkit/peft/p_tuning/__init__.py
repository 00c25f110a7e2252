from .config import PromptEncoderConfig
from .model import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig"]
