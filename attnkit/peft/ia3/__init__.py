from .config import IA3Config
from .layer import IA3Linear
from .model import add_ia3

__all__ = ["IA3Config", "IA3Linear", "add_ia3"]
