from .config import PrefixTuningConfig
from .model import PrefixCache, PrefixEncoder, split_prefix

__all__ = ["PrefixCache", "PrefixEncoder", "PrefixTuningConfig", "split_prefix"]
