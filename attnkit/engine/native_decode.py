"""Decode steps of a Llama-family model on GGUF blocks, all layers in one C call (kernels/decode_step.c).

Eagerly a decode step is ~80 PyTorch operations per layer (RMSNorm, the projections, RoPE, the KV
write, attention, SiLU, the residual adds), about 4 µs each with Python around them: at batch 1 that
overhead is as large as the weight reads themselves. :class:`NativeDecoder` hands the whole stack of
layers to C for steps in which every sequence decodes one token; the embedding lookup (and its scale), the
final norm, the LM head (and its soft-capping) and sampling stay in PyTorch. It computes what the eager model
computes (tests compare the two), and it only takes models it can run exactly (:func:`why_not` names what it
cannot): q/k/v and gate/up projections fused (one matrix, or one part per block type where they differ) on
GGUF blocks of any type the kernels have, no biases but Qwen2's on q/k/v, RMSNorm (with Gemma's 1 + γ, and its
sandwich norms), q/k RMSNorm per head (Qwen3, Gemma 3) or over the projection (OLMoE), SwiGLU or GeGLU, RoPE on
all or part of each head, any softmax scale, attention soft-capping (Gemma 2), each layer's sliding window and a
second RoPE for the windowed layers (Gemma 3: one :class:`_View` per kind of layer), served LoRA adapters on the
dense projections (each row its own adapter, :class:`_Lora`); the FFN gated or a
sparse mixture of SwiGLU experts (:class:`attnkit.nn.moe.SparseMoE`: Qwen3-MoE, Mixtral, OLMoE; kernels/moe.c) with a
float32 or GGUF router.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels import library
from ..quant.native import GGUFBlockLinear
from ..kernels.ops import ACT_BLOCK_BYTES
from .kv_format import KVFormat, kv_format
from .kv_tail import KVTail
from .lora import MultiLoraLinear
from .paged_attention import tail_arg



class _Part(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int), ("rows", ctypes.c_int)]


class _Layer(ctypes.Structure):  # kernels/decode.h's ak_layer
    _fields_ = [("qkv", _Part * 3), ("gate_up", _Part * 2), ("o", _Part), ("down", _Part), ("n_qkv", ctypes.c_int),
                ("n_gate_up", ctypes.c_int), ("qkv_bias", ctypes.c_void_p), ("attn_norm", ctypes.c_void_p),
                ("ffn_norm", ctypes.c_void_p), ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p),
                ("k_tail", ctypes.c_void_p), ("v_tail", ctypes.c_void_p), ("qk_norm", ctypes.c_int),
                ("qk_eps", ctypes.c_float), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("moe", ctypes.c_void_p), ("post_attn_norm", ctypes.c_void_p),
                ("post_ffn_norm", ctypes.c_void_p), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("act", ctypes.c_int), ("view", ctypes.c_int), ("lora_qkv", ctypes.c_void_p), ("lora_o", ctypes.c_void_p),
                ("lora_gate_up", ctypes.c_void_p), ("lora_down", ctypes.c_void_p)]


class _Lora(ctypes.Structure):  # ak_lora: the adapters stacked on one projection (MultiLoraLinear's A, B, columns)
    _fields_ = [("A", ctypes.c_void_p), ("Bt", ctypes.c_void_p), ("cols", ctypes.c_void_p), ("span", ctypes.c_void_p),
                ("R", ctypes.c_int)]


class _View(ctypes.Structure):  # ak_view: what the layers of one kind see in a step
    _fields_ = [("slots", ctypes.c_void_p), ("tables", ctypes.c_void_p), ("lens", ctypes.c_void_p),
                ("starts", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("max_nb", ctypes.c_int)]


class _Expert(ctypes.Structure):  # ak_expert
    _fields_ = [("gate_up", _Part * 2), ("down", _Part), ("n_gate_up", ctypes.c_int)]


class _Moe(ctypes.Structure):  # ak_moe
    _fields_ = [("n_experts", ctypes.c_int), ("top_k", ctypes.c_int), ("norm_topk", ctypes.c_int), ("ff", ctypes.c_int),
                ("router_f32", ctypes.c_void_p), ("router", _Part), ("experts", ctypes.c_void_p)]

_QK_NORM = {None: 0, "head": 1, "full": 2}


def _base(m: nn.Module | None) -> nn.Module | None:
    """A dense projection under its served LoRA adapters (MultiLoraLinear: the step adds their updates), or itself."""
    return m.base if isinstance(m, MultiLoraLinear) else m


def _lora(m: nn.Module | None, keep: list) -> int | None:
    """The address of an ak_lora for a MultiLoraLinear's stacked adapters (kept alive in ``keep``), or None."""
    if not isinstance(m, MultiLoraLinear) or m.A is None:
        return None
    cols = torch.tensor(m.columns, dtype=torch.int64)
    A, Bt = m.A.detach().contiguous(), m.B.detach().t().contiguous()  # type: ignore[union-attr]  (R, in), (R, out)
    nz = Bt != 0  # a fused projection's B is block-diagonal: column r writes one part's outputs
    lo = torch.where(nz.any(1), nz.float().argmax(1), 0)
    hi = torch.where(nz.any(1), Bt.shape[1] - nz.flip(1).float().argmax(1), 0)
    span = torch.stack([lo, hi], 1).to(torch.int64).contiguous()
    lora = _Lora(A.data_ptr(), Bt.data_ptr(), cols.data_ptr(), span.data_ptr(), A.shape[0])
    keep += [A, Bt, cols, span, lora]
    return ctypes.addressof(lora)


def _parts(m: nn.Module) -> list[GGUFBlockLinear]:
    """A projection's matrices of GGUF blocks: the layer itself, or the parts of a fused layer whose parts'
    block types differ (``parts``); empty when it is anything else."""
    parts = list(getattr(m, "parts", [m]))  # a fused layer's bias is its own (the C step adds qkv_bias)
    return parts if all(type(p) is GGUFBlockLinear and (p.bias is None or p is m) for p in parts) else []


def _c_parts(m: nn.Module, n: int):
    parts = _parts(m)
    return (_Part * n)(*(_Part(p.blocks.data_ptr(), p.kernel_kind, p.out_features) for p in parts)), len(parts)


def _float_rmsnorm(norm: nn.Module | None, dim: int) -> bool:
    """An RMSNorm of ``dim`` float32 weights (γ, or Gemma's 1 + γ: the step reads :func:`_norm_weight`)."""
    from ..nn.norm import RMSNorm

    return (type(norm) is RMSNorm and norm.weight.dtype == torch.float32  # type: ignore[union-attr]
            and tuple(norm.weight.shape) == (dim,))  # type: ignore[union-attr]


def _norm_weight(norm: nn.Module, keep: list) -> int:
    """The address of the weights the step multiplies by: γ, or γ + offset as RMSNorm.forward makes it (kept)."""
    w = norm.weight.detach()
    if norm.offset:  # type: ignore[union-attr]
        w = w + norm.offset  # type: ignore[union-attr]
        keep.append(w)
    return w.data_ptr()


_ACTS = {"silu": 0, "gelu_tanh": 1}  # the gated FFN's activation, as ak_layer.act


def _act_code(ffn: nn.Module) -> int | None:
    from ..nn.ffn import ACTIVATIONS

    act = getattr(ffn, "act", None)
    return next((code for name, code in _ACTS.items() if act is ACTIVATIONS[name]), None)


def _gate_up(ffn: nn.Module) -> list[GGUFBlockLinear]:
    """A SwiGLU's gate/up matrices: the fused layer's (one matrix or its parts) or gate_proj, up_proj unfused."""
    gu = getattr(ffn, "gate_up_proj", None)
    if gu is not None:
        return _parts(gu) if getattr(gu, "bias", None) is None else []
    parts = [getattr(ffn, "gate_proj", None), getattr(ffn, "up_proj", None)]
    return parts if all(type(p) is GGUFBlockLinear and p.bias is None for p in parts) else []  # type: ignore[misc]


def _moe_why_not(i: int, ffn: nn.Module, d: int) -> str | None:
    from ..nn.ffn import SwiGLU
    from ..nn.moe import SparseMoE

    if type(ffn) is not SparseMoE:
        return f"layer {i}: its FFN is {type(ffn).__name__}"
    r = ffn.router
    if type(r) is nn.Linear:
        if r.bias is not None or r.weight.dtype != torch.float32:
            return f"layer {i}: the router is not a float32 matrix without bias"
    elif type(r) is not GGUFBlockLinear or r.bias is not None:
        return f"layer {i}: the router is {type(r).__name__}, not float32 or GGUF blocks"
    if (r.in_features, r.out_features) != (d, ffn.n_experts) or len(ffn.experts) != ffn.n_experts:
        return f"layer {i}: the router's shape is not (n_experts, d_model)"
    ff = None
    for e, x in enumerate(ffn.experts):
        if type(x) is not SwiGLU or x.act is not torch.nn.functional.silu:
            return f"layer {i} expert {e}: not a SwiGLU"
        if any(isinstance(m, MultiLoraLinear) for m in x.children()):
            return f"layer {i} expert {e}: served LoRA adapters on the experts (the C step's MoE has none)"
        gu, dn = _gate_up(x), x.down_proj
        if not gu or len(gu) > 2 or type(dn) is not GGUFBlockLinear or dn.bias is not None:
            return f"layer {i} expert {e}: its projections are not GGUF blocks without bias"
        ff = dn.in_features if ff is None else ff
        if dn.in_features != ff or dn.out_features != d or sum(p.out_features for p in gu) != 2 * ff \
                or any(p.in_features != d for p in gu):
            return f"layer {i} expert {e}: its shapes differ from the other experts'"
    return None


def why_not(model: nn.Module, k_pool: torch.Tensor, fmt: KVFormat | None = None) -> str | None:
    """Why the C step cannot run this model exactly, or None when it can: every model feature it does not
    implement is named here. ``fmt``: the pool's row format (None: its float dtype's)."""
    from ..models.llama import Llama

    if library() is None:
        return "the C kernels are not built"
    if not isinstance(model, Llama):
        return f"{type(model).__name__} is not a Llama-family model"
    fmt = fmt or kv_format(k_pool.dtype)
    if k_pool.device.type != "cpu" or fmt.code < 0:
        return f"KV pool of {fmt.name} on {k_pool.device}"
    cfg = model.cfg
    local = getattr(model, "rotary_local", None)
    if local is not None and local.rotary_dim != model.rotary.rotary_dim:
        return "the windowed layers' RoPE rotates another part of each head"
    d, hd, nh, nkv = cfg.d_model, cfg.hd, cfg.n_heads, cfg.n_kv_heads
    dense_ff = set()
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.self_attn, layer.ffn
        moe = hasattr(ffn, "experts")
        mods = {"qkv_proj": getattr(attn, "qkv_proj", None), "o_proj": attn.o_proj}
        if not moe:
            mods.update(gate_up_proj=getattr(ffn, "gate_up_proj", None), down_proj=getattr(ffn, "down_proj", None))
        for name, m in list(mods.items()):
            if isinstance(m, MultiLoraLinear) and m.A is not None and not (
                    m.A.dtype == m.B.dtype == torch.float32 and m.A.device.type == "cpu"):  # type: ignore[union-attr]
                return f"layer {i} {name}: LoRA adapters not float32 on the CPU"
            mods[name] = m = _base(m)
            if type(m) is GGUFBlockLinear:
                if m.bias is not None and name != "qkv_proj":
                    return f"layer {i} {name} has a bias"
            elif not _parts(m) or len(_parts(m)) > (3 if name == "qkv_proj" else 2 if name == "gate_up_proj" else 1):
                return f"layer {i} {name} is {type(m).__name__}, not GGUF blocks"
        post = [n for n in (getattr(layer, "post_attn_norm", None), getattr(layer, "post_ffn_norm", None)) if n is not None]
        for norm in (layer.norm1, layer.norm2, *post):
            if not _float_rmsnorm(norm, d) or norm.eps != model.layers[0].norm1.eps:
                return f"layer {i}: not a float32 RMSNorm (of the first layer's eps)"
        if not layer.norm_first:
            return f"layer {i}: not pre-norm"
        qk = getattr(attn, "qk_norm", None)
        if qk not in _QK_NORM:
            return f"layer {i}: q/k norm {qk!r}"
        if qk is not None:
            nq, nk = (hd, hd) if qk == "head" else (nh * hd, nkv * hd)
            if not (_float_rmsnorm(attn.q_norm, nq) and _float_rmsnorm(attn.k_norm, nk)) \
                    or attn.q_norm.eps != attn.k_norm.eps:
                return f"layer {i}: q/k norms are not float32 RMSNorms"
        if moe:
            reason = _moe_why_not(i, ffn, d)
            if reason:
                return reason
        elif not hasattr(ffn, "gate_up_proj") or _act_code(ffn) is None:
            return f"layer {i}: not a pre-norm SwiGLU or GeGLU"
        else:
            dense_ff.add(_base(ffn.down_proj).in_features)
    if len(dense_ff) > 1:
        return "dense layers of different d_ff"
    return None


class NativeDecoder:
    """The decode step in C for one model and KV pool (build it only where :func:`why_not` says None).

    It takes steps of up to ``max_rows`` sequences: the layers' own limit for their integer kernel (8 on
    GGUF's row layout, 64 on interleaved blocks); more go to the eager path and its dense products.
    """

    def __init__(self, model: nn.Module, k_pool: torch.Tensor, v_pool: torch.Tensor, fmt: KVFormat | None = None,
                 tail: KVTail | None = None, layer_views: list[int] | None = None) -> None:
        """``layer_views``: each layer's view (the engine's (KV group, window) metadata it reads; all 0 when None):
        :meth:`hidden` takes the tables of view 0, then ``others`` for views 1, …."""
        self.model, self.lib, self.tail = model, library(), tail
        cfg = model.cfg
        self.d, self.nh, self.nkv, self.hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.rd = model.rotary.rotary_dim
        if layer_views is None and len({getattr(layer.self_attn, "window", None) for layer in model.layers}) > 1:
            raise ValueError("NativeDecoder: layers of different sliding windows read different views: give layer_views")
        self.layer_views = layer_views or [0] * len(model.layers)
        local = getattr(model, "rotary_local", None)  # the windowed layers' RoPE (Gemma 3), else the model's
        self.view_rotary: dict[int, nn.Module] = {}
        for v, layer in zip(self.layer_views, model.layers):
            rotary = local if local is not None and getattr(layer.self_attn, "window", None) is not None else model.rotary
            if self.view_rotary.setdefault(v, rotary) is not rotary:
                raise ValueError(f"view {v}: its layers use different RoPEs")
        dense = [layer.ffn for layer in model.layers if not hasattr(layer.ffn, "experts")]
        self.ff = _base(dense[0].down_proj).in_features if dense else 0  # the dense layers' (why_not: all the same)
        self.eps = float(model.layers[0].norm1.eps)
        self.kv_type = (fmt or kv_format(k_pool.dtype)).code  # the C step's: 0 float32, 1 float16, 2 q8_0, 3 q4_0
        _, _, self.num_blocks, self.bs, _ = k_pool.shape
        layers = []
        self.max_rows = min(m.decode_rows for m in model.modules() if isinstance(m, GGUFBlockLinear))  # without batch invariance
        keep: list = [k_pool, v_pool]  # the pointers below stay valid while the decoder lives
        self._moe_shapes: list[tuple[int, int, int]] = []  # (n_experts, top_k, ff) of each MoE layer
        self._moe_of: dict[int, _Moe] = {}  # id(SparseMoE) → its C view, for prompt rows (moe_rows)
        self._moe_work = torch.empty(0, dtype=torch.uint8)
        for i, layer in enumerate(model.layers):
            attn, ffn = layer.self_attn, layer.ffn
            qkv, o = _base(attn.qkv_proj), _base(attn.o_proj)
            qkv_parts, n_qkv = _c_parts(qkv, 3)
            bias = getattr(qkv, "bias", None)
            qk = _QK_NORM[getattr(attn, "qk_norm", None)]
            moe = self._moe(ffn, keep) if hasattr(ffn, "experts") else None
            if moe is None:
                (gu_parts, n_gu), down = _c_parts(_base(ffn.gate_up_proj), 2), _c_parts(_base(ffn.down_proj), 1)[0][0]
            else:
                (gu_parts, n_gu), down = ((_Part * 2)(), 0), _Part()
            layers.append(_Layer(qkv_parts, gu_parts, _c_parts(o, 1)[0][0], down, n_qkv, n_gu,
                                 bias.data_ptr() if bias is not None else None,
                                 _norm_weight(layer.norm1, keep), _norm_weight(layer.norm2, keep),
                                 k_pool[i].data_ptr(), v_pool[i].data_ptr(),
                                 tail.k[i].data_ptr() if tail is not None else None,
                                 tail.v[i].data_ptr() if tail is not None else None, qk,
                                 float(attn.q_norm.eps) if qk else 0.0,
                                 _norm_weight(attn.q_norm, keep) if qk else None,
                                 _norm_weight(attn.k_norm, keep) if qk else None,
                                 ctypes.addressof(moe) if moe is not None else None,
                                 *(_norm_weight(n, keep) if n is not None else None
                                   for n in (getattr(layer, "post_attn_norm", None), getattr(layer, "post_ffn_norm", None))),
                                 float(getattr(attn, "scale", None) or self.hd ** -0.5),
                                 float(getattr(attn, "softcap", None) or 0.0),
                                 _act_code(ffn) if moe is None else 0, self.layer_views[i],
                                 _lora(attn.qkv_proj, keep), _lora(attn.o_proj, keep),
                                 *((_lora(ffn.gate_up_proj, keep), _lora(ffn.down_proj, keep)) if moe is None
                                   else (None, None))))
        self.layers = (_Layer * len(layers))(*layers)
        self.keep = keep
        self.threads = torch.get_num_threads()
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _moe(self, ffn: nn.Module, keep: list) -> _Moe:
        """The C view of a SparseMoE layer (its structs and router weight kept alive in ``keep``)."""
        experts = []
        for x in ffn.experts:
            gu = _gate_up(x)
            parts = (_Part * 2)(*(_Part(p.blocks.data_ptr(), p.kernel_kind, p.out_features) for p in gu))
            dn = x.down_proj
            experts.append(_Expert(parts, _Part(dn.blocks.data_ptr(), dn.kernel_kind, dn.out_features), len(gu)))
        arr = (_Expert * len(experts))(*experts)
        r = ffn.router
        router_f32, router = None, _Part()
        if type(r) is GGUFBlockLinear:
            router = _Part(r.blocks.data_ptr(), r.kernel_kind, r.out_features)
        else:
            w = r.weight.detach().contiguous()
            keep.append(w)
            router_f32 = w.data_ptr()
        ff = ffn.experts[0].down_proj.in_features
        moe = _Moe(ffn.n_experts, ffn.top_k, int(bool(ffn.norm_topk_prob)), ff, router_f32, router,
                   ctypes.addressof(arr))
        keep += [arr, moe]
        self._moe_shapes.append((ffn.n_experts, ffn.top_k, ff))
        self._moe_of[id(ffn)] = moe
        return moe

    def moe_rows(self, ffn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """A SparseMoE layer of this model on rows x (N, d) float32 by the decode step's own C function
        (kernels/moe.c: the router, each chosen expert once on its rows, all in one parallel call), or None for a
        layer or input it does not take. For the engine's prompt rows (attnkit.nn.moe.moe_rows_by): a row's result
        does not depend on the other rows, as in a decode step."""
        moe = self._moe_of.get(id(ffn))
        if moe is None or x.dtype != torch.float32 or x.requires_grad or x.dim() != 2:
            return None
        x = x.contiguous()
        n, d = x.shape
        work = self._moe_buffer(n)
        out = torch.empty_like(x)
        rc = self.lib.ak_moe_ffn(ctypes.addressof(moe), x.data_ptr(), out.data_ptr(), n, d, work.data_ptr(),
                                 work.numel(), self.threads)
        if rc:
            raise RuntimeError(f"ak_moe_ffn failed (code {rc})")
        return out

    def _moe_buffer(self, rows: int) -> torch.Tensor:
        """The MoE layers' work space for ``rows`` rows (ak_moe_work_bytes of the widest layer): one buffer for the
        decode steps and the prompts' rows (moe_rows), grown to the largest; empty without MoE layers."""
        need = max((self.lib.ak_moe_work_bytes(rows, self.d, e, k, ff, self.threads) for e, k, ff in self._moe_shapes),
                   default=0)
        if self._moe_work.numel() < need:
            self._moe_work = torch.empty(need, dtype=torch.uint8)
        return self._moe_work

    def _scratch(self, B: int, max_nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (B, max_nb)
        if key not in self._buffers:
            nq, nqkv = self.nh * self.hd, (self.nh + 2 * self.nkv) * self.hd
            work = torch.empty(B * (2 * self.d + nqkv + 2 * nq + 2 * self.ff + max(nqkv, 2 * self.ff)))
            act = torch.empty(B * max(self.d, self.ff, nq) // 32 * ACT_BLOCK_BYTES, dtype=torch.uint8)
            scores = torch.empty(self.threads * (self.nh // self.nkv) * max_nb * self.bs)
            self._buffers = {key: (work, act, scores)}  # one shape at a time
        return self._buffers[key]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, d) → final norm → LM head → logits (B, vocab). A GGUF head takes the
        decode rows through its integer kernel, as the layers did, however many there are (batch invariance)."""
        head = getattr(self.model, "output_head", None)
        if isinstance(head, GGUFBlockLinear):
            logits = head.kernel_product(self.model.norm(h))
            c = self.model.cfg.final_softcap
            return logits if c is None else torch.tanh(logits / c) * c  # as Llama.logits
        return self.model.logits(h[None])[0]

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
               lens: torch.Tensor, starts: torch.Tensor, tail: tuple[torch.Tensor, torch.Tensor] | None = None,
               others: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...] = (),
               adapters: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions, slots (B,); tables (B, max_nb); lens, starts (B,) → the last layer's output (B, d).
        slots … starts are view 0's; ``others``: (slots, tables, lens, starts) of views 1, … (the layers of another
        KV group or window). ``tail``: each row's exact-block slot and first exact key (B,) each
        (attnkit.engine.kv_tail), or None. ``adapters``: each row's LoRA adapter id (B,) int64 (0: the base), or None."""
        x = self.model.tok_embeddings(ids)  # (B, d)
        if self.model.cfg.embed_scale != 1.0:  # as Llama.forward: the scale rounded to the embeddings' dtype
            x = x * torch.tensor(self.model.cfg.embed_scale, dtype=x.dtype)
        x = x.float().contiguous()
        keep: list = []
        views = (_View * (1 + len(others)))()
        angles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rotary) → cos, sin (B, rd): once a RoPE
        for v, meta in enumerate(((slots, tables, lens, starts), *others)):
            rotary = self.view_rotary.get(v, self.model.rotary)
            if id(rotary) not in angles:
                angles[id(rotary)] = tuple(t.contiguous() for t in rotary.cos_sin(positions))  # type: ignore[assignment]
            cos, sin = angles[id(rotary)]
            ts = [t.contiguous() for t in meta]
            keep += ts
            views[v] = _View(*(t.data_ptr() for t in ts), cos.data_ptr(), sin.data_ptr(), ts[1].shape[1])
        B = ids.shape[0]
        ada = adapters.to(torch.int64).contiguous() if adapters is not None else None
        work, act, scores = self._scratch(B, max(view.max_nb for view in views))
        moe = self._moe_buffer(B)
        rc = self.lib.ak_llama_decode(self.layers, len(self.layers), x.data_ptr(), B, self.d, self.nh, self.nkv, self.hd,
                                      self.rd, self.ff, ctypes.c_float(self.eps), views, self.bs, self.num_blocks,
                                      self.kv_type, work.data_ptr(), act.data_ptr(), scores.data_ptr(),
                                      moe.data_ptr() if moe.numel() else None, moe.numel(), self.threads,
                                      tail_arg(self.tail, tail, keep), ada.data_ptr() if ada is not None else None)
        if rc:
            raise RuntimeError(f"ak_llama_decode failed (code {rc})")
        return x
