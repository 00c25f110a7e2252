"""attnkit: the Transformer from first principles, up to an inference engine and PEFT."""

__version__ = "0.1.0"
