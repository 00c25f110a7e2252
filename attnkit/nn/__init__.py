"""Building blocks of the Transformer; every model in attnkit is composed of these."""

from .attention import MultiHeadAttention, repeat_kv, scaled_dot_product_attention
from .ffn import FeedForward, SwiGLU, make_ffn
from .kv_cache import DecoderCache, KVCache
from .layers import DecoderLayer, TransformerLayer, add_norm
from .masks import (
    causal_mask,
    combine_masks,
    cross_attention_mask,
    from_key_padding_mask,
    lengths_mask,
    padding_mask,
    self_attention_mask,
)
from .norm import LayerNorm, RMSNorm, make_norm
from .positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    sinusoidal_table,
    t5_relative_bucket,
)

__all__ = [name for name in dir() if not name.startswith("_")]
