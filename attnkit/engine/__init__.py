"""The inference engine: paged KV cache with prefix caching, continuous batching, batched sampling.

One idea per file (after vLLM and nano-vllm): :mod:`.sampling_params`, :mod:`.sequence`,
:mod:`.block_manager`, :mod:`.scheduler`, :mod:`.paged_attention`, :mod:`.model_runner`,
:mod:`.sampler`, :mod:`.grammar` (structured outputs), :mod:`.llm_engine`, :mod:`.async_engine`, :mod:`.llm` (the user-facing API).
"""

from .async_engine import AsyncLLMEngine
from .llm import LLM
from .llm_engine import EngineConfig, LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams",
           "SamplingParamsError", "StructuredOutputs"]
