"""How a model is prepared for serving: activation dtype, weight quantization, fusion, threads, compile.

One home for these choices, shared by ``LLM``, ``attnkit generate/chat/serve`` and the benchmarks:

- ``dtype``: activations and every weight left in floating point (float32, bfloat16);
- ``quantize`` (default ``"gguf"``): ``"gguf"`` keeps a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are, multiplied by
  attnkit's own kernel (:mod:`attnkit.quant.native`); ``"auto"`` maps them onto PyTorch's int4/int8
  kernels (:mod:`attnkit.quant`); ``"int8"``/``"int4"`` quantize whatever was loaded; ``None``
  dequantizes to ``dtype``;
- ``fuse``: q/k/v and gate/up projections as one product each (:mod:`attnkit.nn.fused`);
- ``threads``: torch's CPU threads (default: torch's choice, the physical cores);
- ``compile``: the decode attention compiled to read K/V through the block tables (torch.compile);
- ``kv_cache_dtype``: the engine's K/V pool; ``"auto"`` is float16 on the gguf path (llama.cpp's default:
  Q4 weights with an f16 KV cache, half the bytes of float32 per cached token), else ``dtype``; ``"q8_0"``
  (alias ``"int8"``) and ``"q4_0"`` (``"int4"``) quantize the cached rows as llama.cpp's ``-ctk q8_0/q4_0``
  (:mod:`attnkit.engine.kv_format`);
- ``matmul_dtype``: on the gguf path, the dtype of the dense products of batches above the kernel's 8 rows
  (prefill, large decode batches); ``"auto"`` sends the engine's prompt rows through the integer matrix product
  where a layer has one (every block type with AVX-512 VNNI, 256 | its inputs: kernels/gemm.c, 8-bit activations as llama.cpp)
  and takes bfloat16 where the CPU has bf16 hardware (:func:`attnkit.kernels.native_bf16`: 2–3× the float32
  speed there, perplexity +0.06%), else float32; ``"bfloat16"`` or ``"float32"`` send every prompt row to the
  dense product in that dtype.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when a model is loaded: the CLI's --help stays quick
    import torch

    from ..loading import CausalLM
    from ..parallel.tensor import TensorParallel

DTYPES = ("bfloat16", "float32")
QUANTIZE = ("gguf", "auto", "int8", "int4", "none")
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32", "q8_0", "q4_0", "int8", "int4")
MATMUL_DTYPES = ("auto", "bfloat16", "float32")


EXACT_BLOCKS = {"auto": None, "on": True, "off": False}


@dataclass
class InferenceOptions:
    dtype: str = "float32"
    quantize: str | None = "gguf"
    fuse: bool = True
    threads: int | None = None
    compile: bool = False
    kv_cache_dtype: str = "auto"
    matmul_dtype: str = "auto"
    kv_exact_blocks: str = "auto"  # on | off | auto (on for q4_0): attnkit.engine.kv_tail

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.quantize == "none":
            self.quantize = None
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {list(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if self.kv_exact_blocks not in EXACT_BLOCKS:
            raise ValueError(f"kv_exact_blocks must be one of {list(EXACT_BLOCKS)}, got {self.kv_exact_blocks!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def engine_kv_cache_dtype(self) -> str:
        """The engine's ``kv_cache_dtype``: "auto" is float16 when ``quantize == "gguf"``, else ``dtype``."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        return "float16" if self.quantize == "gguf" else self.dtype

    def engine_kv_exact_blocks(self) -> bool | None:
        """The engine's ``kv_exact_blocks``: None ("auto": on for q4_0), True or False."""
        return EXACT_BLOCKS[self.kv_exact_blocks]

    def gguf_matmul_dtype(self) -> str:
        """The dense-product dtype of GGUF block layers: ``matmul_dtype``, "auto" resolved for this CPU."""
        if self.matmul_dtype != "auto":
            return self.matmul_dtype
        from ..kernels import native_bf16

        return "bfloat16" if native_bf16() else "float32"

    def load(self, path: str | Path | None, tp: TensorParallel | None = None) -> CausalLM:
        """Set the threads, load the checkpoint (None: the embedded default) and prepare its model; ``tp``: only a
        tensor-parallel rank's slice (:mod:`attnkit.parallel.tensor`)."""
        import torch

        from ..loading import load_causal_lm
        from ..nn.fused import fuse_for_inference
        from ..quant.native import set_dense_dtype

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        lm = load_causal_lm(path, self.torch_dtype, quantize=self.quantize, tp=tp)
        if self.fuse:
            fuse_for_inference(lm.model)
        if self.quantize == "gguf":
            set_dense_dtype(lm.model, getattr(torch, self.gguf_matmul_dtype()),
                            int8_prompts=None if self.matmul_dtype == "auto" else False)
        return lm

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="activation dtype (default float32)")
        p.add_argument("--quantize", choices=QUANTIZE, default="gguf",
                       help="weights in memory: gguf = the GGUF file's own blocks under attnkit's kernel; auto = "
                            "them on PyTorch's int4/int8 kernels; int8/int4 = quantize; none = dequantize to --dtype "
                            "(default: gguf)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--compile", action="store_true",
                       help="decode attention compiled over the block tables (torch.compile; slower start-up)")
        p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                       help="dtype of the cached keys and values (default auto: float16 with --quantize gguf, "
                            "as llama.cpp; else --dtype); q8_0/int8 and q4_0/int4 quantize them (llama.cpp's -ctk)")
        p.add_argument("--kv-exact-blocks", choices=list(EXACT_BLOCKS), default="auto",
                       help="a quantized K/V cache reads each query's own block from q8_0 rows kept aside "
                            "(default auto: on for q4_0, whose perplexity cost it cuts from 8%% to under 2%%; off: "
                            "q4_0 exactly as llama.cpp's)")
        p.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="auto",
                       help="with --quantize gguf: dtype of the matrix products of prefill and large batches "
                            "(default auto: prompts through the integer matrix product where the layer's blocks "
                            "have one on this CPU (AVX-512 VNNI), else bfloat16 where the CPU "
                            "has bf16 instructions, else float32; bfloat16/float32: every prompt row dense)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InferenceOptions:
        return cls(dtype=args.dtype, quantize=args.quantize, threads=args.threads, compile=args.compile,
                   kv_cache_dtype=args.kv_cache_dtype, matmul_dtype=args.matmul_dtype,
                   kv_exact_blocks=args.kv_exact_blocks)
