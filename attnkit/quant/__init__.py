"""Weight-only quantization: int8 / int4 linear layers on PyTorch's CPU kernels, kept quantized in memory.

- :class:`Int8Linear`: per-output-channel int8 (``torch._weight_int8pack_mm``);
- :class:`Int4Linear`: group-wise int4 with scales and zeros (``torch._weight_int4pack_mm_for_cpu``);
  GGUF Q4_0/Q4_1 blocks load into it exactly (:func:`attnkit.loading.load_causal_lm` with ``quantize=``);
- :func:`quantize_model`: replace a float model's linear layers (and LM head) in place;
- :func:`cat_out`: join layers along the output dimension (fused q/k/v, gate/up).

See docs/quantization.md for the kernels' speed and the perplexity each scheme keeps.
"""

from .base import QuantLinear
from .int4 import GROUP_SIZES, Int4Linear
from .int8 import Int8Linear
from .quantize import SCHEMES, cat_out, model_weight_bytes, quantize_model, quantize_weight, set_compute_dtype

__all__ = ["GROUP_SIZES", "SCHEMES", "Int4Linear", "Int8Linear", "QuantLinear", "cat_out", "model_weight_bytes",
           "quantize_model", "quantize_weight", "set_compute_dtype"]
