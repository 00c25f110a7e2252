from .config import LoraConfig
from .layer import LoraLinear
from .model import add_lora

__all__ = ["LoraConfig", "LoraLinear", "add_lora"]
