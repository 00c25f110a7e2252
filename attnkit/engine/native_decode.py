"""Decode steps of a Llama-family model on GGUF blocks, all layers in one C call (kernels/decode_step.c).

Eagerly a decode step is ~80 PyTorch operations per layer (RMSNorm, the projections, RoPE, the KV
write, attention, SiLU, the residual adds), about 4 µs each with Python around them: at batch 1 that
overhead is as large as the weight reads themselves. :class:`NativeDecoder` hands the whole stack of
layers to C for steps in which every sequence decodes one token; the embedding lookup, the final norm,
the LM head and sampling stay in PyTorch. It computes what the eager model computes (tests compare the
two), and it only takes models it can run exactly: q/k/v and gate/up projections fused (one matrix, or one
part per block type where they differ) on GGUF blocks of any type the kernels have, no biases but Qwen2's
on q/k/v, RMSNorm without offset, SiLU, full rotary, no LoRA.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels import library
from ..quant.native import ACT_BLOCK_BYTES, GGUFBlockLinear



class _Part(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int), ("rows", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Part * 3), ("gate_up", _Part * 2), ("o", _Part), ("down", _Part), ("n_qkv", ctypes.c_int),
                ("n_gate_up", ctypes.c_int), ("qkv_bias", ctypes.c_void_p), ("attn_norm", ctypes.c_void_p),
                ("ffn_norm", ctypes.c_void_p), ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p)]


def _parts(m: nn.Module) -> list[GGUFBlockLinear]:
    """A projection's matrices of GGUF blocks: the layer itself, or the parts of a fused layer whose parts'
    block types differ (``parts``); empty when it is anything else."""
    parts = list(getattr(m, "parts", [m]))  # a fused layer's bias is its own (the C step adds qkv_bias)
    return parts if all(type(p) is GGUFBlockLinear and (p.bias is None or p is m) for p in parts) else []


def _c_parts(m: nn.Module, n: int):
    parts = _parts(m)
    return (_Part * n)(*(_Part(p.blocks.data_ptr(), p.kernel_kind, p.out_features) for p in parts)), len(parts)


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
            if type(m) is GGUFBlockLinear:
                if m.bias is not None and name != "qkv_proj":
                    return f"layer {i} {name} has a bias"
            elif not _parts(m) or len(_parts(m)) > (3 if name == "qkv_proj" else 2 if name == "gate_up_proj" else 1):
                return f"layer {i} {name} is {type(m).__name__}, not GGUF blocks"
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
        self.max_rows = min(m.decode_rows for m in model.modules() if isinstance(m, GGUFBlockLinear))  # without batch invariance
        for i, layer in enumerate(model.layers):
            attn, ffn = layer.self_attn, layer.ffn
            qkv, o, gu, dn = attn.qkv_proj, attn.o_proj, ffn.gate_up_proj, ffn.down_proj
            (qkv_parts, n_qkv), (gu_parts, n_gu) = _c_parts(qkv, 3), _c_parts(gu, 2)
            bias = getattr(qkv, "bias", None)
            layers.append(_Layer(qkv_parts, gu_parts, _c_parts(o, 1)[0][0], _c_parts(dn, 1)[0][0], n_qkv, n_gu,
                                 bias.data_ptr() if bias is not None else None,
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
            work = torch.empty(B * (2 * self.d + nqkv + 2 * nq + 2 * self.ff + max(nqkv, 2 * self.ff)))
            act = torch.empty(B * max(self.d, self.ff, nq) // 32 * ACT_BLOCK_BYTES, dtype=torch.uint8)
            scores = torch.empty(self.threads * (self.nh // self.nkv) * max_nb * self.bs)
            self._buffers = {key: (work, act, scores)}  # one shape at a time: decode steps repeat it
        return self._buffers[key]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, d) → final norm → LM head → logits (B, vocab). A GGUF head takes the
        decode rows through its integer kernel, as the layers did, however many there are (batch invariance)."""
        head = getattr(self.model, "output_head", None)
        if isinstance(head, GGUFBlockLinear):
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
