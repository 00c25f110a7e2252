"""Decode steps of a Llama-family model on GGUF blocks, all layers in one C call (kernels/decode_step.c).

Eagerly a decode step is ~80 PyTorch operations per layer (RMSNorm, the projections, RoPE, the KV
write, attention, SiLU, the residual adds), about 4 µs each with Python around them: at batch 1 that
overhead is as large as the weight reads themselves. :class:`NativeDecoder` hands the whole stack of
layers to C for steps in which every sequence decodes one token; the embedding lookup, the final norm,
the LM head and sampling stay in PyTorch. It computes what the eager model computes (tests compare the
two), and it only takes models it can run exactly: fused q/k/v and gate/up projections on Q4_1/Q8_0
blocks, no biases but Qwen2's on q/k/v, RMSNorm without offset, SiLU, full rotary, no LoRA.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels import library
from ..quant.native import ACT_BLOCK_BYTES, GGUFBlockLinear



class _Layer(ctypes.Structure):
    _fields_ = [("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("qkv_kind", ctypes.c_int), ("o_kind", ctypes.c_int),
                ("gate_up_kind", ctypes.c_int), ("down_kind", ctypes.c_int), ("qkv_bias", ctypes.c_void_p),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("k_pool", ctypes.c_void_p),
                ("v_pool", ctypes.c_void_p)]


def why_not(model: nn.Module, k_pool: torch.Tensor) -> str | None:
    """Why the C step cannot run this model exactly, or None when it can."""
    from ..models.llama import Llama
    from ..nn.norm import RMSNorm

    if library() is None:
        return "the C kernels are not built"
    if not isinstance(model, Llama):
        return f"{type(model).__name__} is not a Llama-family model"
    if k_pool.device.type != "cpu" or k_pool.dtype not in (torch.float32, torch.float16):
        return f"KV pool of {k_pool.dtype} on {k_pool.device}"
    if model.rotary.rotary_dim != model.cfg.hd:
        return "partial rotary"
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.self_attn, layer.ffn
        mods = {"qkv_proj": getattr(attn, "qkv_proj", None), "o_proj": attn.o_proj,
                "gate_up_proj": getattr(ffn, "gate_up_proj", None), "down_proj": getattr(ffn, "down_proj", None)}
        for name, m in mods.items():
            if type(m) is not GGUFBlockLinear:
                return f"layer {i} {name} is {type(m).__name__}, not GGUF blocks"
            if m.bias is not None and name != "qkv_proj":
                return f"layer {i} {name} has a bias"
        for norm in (layer.norm1, layer.norm2):
            if type(norm) is not RMSNorm or norm.offset or norm.weight.dtype != torch.float32:
                return f"layer {i}: not a plain float32 RMSNorm"
        if not layer.norm_first or getattr(ffn, "act", None) is not torch.nn.functional.silu:
            return f"layer {i}: not pre-norm SwiGLU"
    return None


class NativeDecoder:
    """The decode step in C for one model and KV pool (build it only where :func:`why_not` says None).

    It takes steps of up to ``max_rows`` sequences: the layers' own limit for their integer kernel (8 on
    GGUF's row layout, 64 on interleaved blocks); more go to the eager path and its dense products.
    """

    def __init__(self, model: nn.Module, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        self.model, self.lib = model, library()
        cfg = model.cfg
        self.d, self.nh, self.nkv, self.hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.ff = model.layers[0].ffn.down_proj.in_features
        self.eps = float(model.layers[0].norm1.eps)
        self.f16 = int(k_pool.dtype == torch.float16)
        _, _, self.num_blocks, self.bs, _ = k_pool.shape
        layers = []
        self.max_rows = min(m.decode_rows for m in model.modules() if isinstance(m, GGUFBlockLinear))
        for i, layer in enumerate(model.layers):
            attn, ffn = layer.self_attn, layer.ffn
            qkv, o, gu, dn = attn.qkv_proj, attn.o_proj, ffn.gate_up_proj, ffn.down_proj
            layers.append(_Layer(qkv.blocks.data_ptr(), o.blocks.data_ptr(), gu.blocks.data_ptr(), dn.blocks.data_ptr(),
                                 qkv.kernel_kind, o.kernel_kind, gu.kernel_kind, dn.kernel_kind,
                                 qkv.bias.data_ptr() if qkv.bias is not None else None,
                                 layer.norm1.weight.data_ptr(), layer.norm2.weight.data_ptr(),
                                 k_pool[i].data_ptr(), v_pool[i].data_ptr()))
        self.layers = (_Layer * len(layers))(*layers)
        self.keep = (k_pool, v_pool)  # the pointers above stay valid while the decoder lives
        self.threads = torch.get_num_threads()
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _scratch(self, B: int, max_nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (B, max_nb)
        if key not in self._buffers:
            nq, nqkv = self.nh * self.hd, (self.nh + 2 * self.nkv) * self.hd
            work = torch.empty(B * (2 * self.d + nqkv + 2 * nq + 2 * self.ff))
            act = torch.empty(B * max(self.d, self.ff, nq) // 32 * ACT_BLOCK_BYTES, dtype=torch.uint8)
            scores = torch.empty(self.threads * (self.nh // self.nkv) * max_nb * self.bs)
            self._buffers = {key: (work, act, scores)}  # one shape at a time: decode steps repeat it
        return self._buffers[key]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, d) → final norm → LM head → logits (B, vocab). A GGUF head takes the
        B decode rows through its integer kernel, as the layers did (the eager forward would go dense above 8)."""
        head = getattr(self.model, "output_head", None)
        if isinstance(head, GGUFBlockLinear) and len(h) <= head.decode_rows:
            return head.kernel_product(self.model.norm(h))
        return self.model.logits(h[None])[0]

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
               lens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """ids, positions, slots (B,); tables (B, max_nb); lens, starts (B,) → the last layer's output (B, d)."""
        x = self.model.tok_embeddings(ids).float().contiguous()  # (B, d)
        cos, sin = self.model.rotary.cos_sin(positions)  # (B, hd) each
        cos, sin = cos.contiguous(), sin.contiguous()
        B, max_nb = tables.shape
        work, act, scores = self._scratch(B, max_nb)
        keep = [t.contiguous() for t in (slots, tables, lens, starts)]
        rc = self.lib.ak_llama_decode(self.layers, len(self.layers), x.data_ptr(), B, self.d, self.nh, self.nkv, self.hd,
                                      self.ff, ctypes.c_float(self.eps), cos.data_ptr(), sin.data_ptr(),
                                      *(t.data_ptr() for t in keep), max_nb, self.bs, self.num_blocks, self.f16,
                                      work.data_ptr(), act.data_ptr(), scores.data_ptr(), self.threads)
        if rc:
            raise RuntimeError(f"ak_llama_decode failed (code {rc})")
        return x
