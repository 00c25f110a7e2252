from .config import BottleneckConfig
from .layer import AdapterLayer, BottleneckAdapter
from .model import add_bottleneck

__all__ = ["AdapterLayer", "BottleneckAdapter", "BottleneckConfig", "add_bottleneck"]
