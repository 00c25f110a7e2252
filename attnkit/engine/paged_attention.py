"""Batched variable-length attention over block tables (PagedAttention, Kwon et al. 2023).

The whole step is one packed row of tokens (1, T_total): every sequence's new tokens, one after
another, so the linear layers see no padding. Per layer, :class:`PagedKVCache` plugs into
:class:`~attnkit.nn.MultiHeadAttention` through the cache protocol: it writes the new K/V into
their slots of the block pool and runs attention itself (``attends = True``):

- decodes (one new token each) are batched: each sequence's blocks are gathered into a padded
  (B, n_kv, L, hd) view and one masked SDPA call covers them all;
- prefill chunks attend, one call each, to their cached prefix plus themselves (causal).

The same code runs on CUDA tensors; only the pool's device changes.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn.attention import scaled_dot_product_attention
from .kv_format import KVFormat, hadamard64, kv_format
from .kv_tail import ROW as TAIL_ROW
from .kv_tail import KVTail


@dataclass
class PrefillChunk:
    start: int  # offset in the packed tokens
    end: int
    context_len: int  # keys it attends to: cached prefix + the chunk
    block_table: torch.Tensor  # (n_blocks,) covering context_len
    mask: torch.Tensor | None  # (n, context_len) bool; None: plainly causal (no cached prefix, no window cut)
    # exact blocks (attnkit.engine.kv_tail): the tail slot of the block the chunk starts in and the first key of that
    # block held there (rows before it are read from the pool); None: the chunk reads every key from the pool
    tail: tuple[int, int] | None = None


@dataclass
class AttentionMetadata:
    """Everything about one step's layout; built once per step, shared by all layers."""

    slots: torch.Tensor  # (T_total,) flat slot (block * block_size + offset) of each new token
    decode_index: torch.Tensor | None = None  # (B_d,) positions in the packed row
    decode_tables: torch.Tensor | None = None  # (B_d, max_blocks)
    decode_bias: torch.Tensor | None = None  # (B_d, max_blocks * block_size): 0 = visible, −∞ = not
    decode_lens: torch.Tensor | None = None  # (B_d,) keys start ≤ j < len are visible (the native kernel's form)
    decode_starts: torch.Tensor | None = None
    native: object = None  # NativeDecodeArgs once prepared; False when the C kernel does not apply
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_only: bool = False  # every token is a decode: the output is the decode attention's, in order
    fused_gather: bool = False  # inside torch.compile: index the pool in the attention kernel itself
    scratch: list[torch.Tensor] = field(default_factory=list)  # the decode gather's buffers, reused by every layer
    # SnapKV's observation windows: (rows in the packed row, the list each layer appends its queries (nh, m, hd) to)
    observe: list[tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)
    # a 4-bit cache's exact blocks (attnkit.engine.kv_tail): each new token's (tail slot, offset), each decode
    # query's (tail slot, first key read from it) — slot -1: none
    tail_write: tuple[torch.Tensor, torch.Tensor] | None = None
    decode_tail: tuple[torch.Tensor, torch.Tensor] | None = None


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             fmt: KVFormat | None = None) -> None:
    """Store the new tokens' K/V (n_kv, T, hd) in their slots of the pools (n_kv, num_blocks, block_size, width):
    converted to the pool's dtype, or quantized into rows of ``fmt`` (width = the row's bytes)."""
    n_kv, _, _, width = k_pool.shape
    if fmt is not None and fmt.quantized:
        k, v = fmt.quantize(k), fmt.quantize(v)
    elif k.dtype != k_pool.dtype:
        k, v = k.to(k_pool.dtype), v.to(v_pool.dtype)
    k_pool.view(n_kv, -1, width).index_copy_(1, slots, k)
    v_pool.view(n_kv, -1, width).index_copy_(1, slots, v)


class PagedKVCache:
    """One layer's view of the block pool; implements the ``attends`` side of the cache protocol.

    The pool is head-major, (n_kv, num_blocks, block_size, hd): gathering a sequence's blocks along
    dim 1 gives each KV head's keys contiguous, (n_kv, B, L, hd), ready for batched matrix products
    without a transpose copy.
    """

    attends = True

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float | None = None,
                 softcap: float | None = None, fmt: KVFormat | None = None, tail: KVTail | None = None,
                 layer: int = 0) -> None:
        self.k_pool, self.v_pool = k_pool, v_pool  # (n_kv, num_blocks, block_size, width): width = hd unless quantized
        self.fmt = fmt or kv_format(k_pool.dtype)  # how a row is stored
        self.meta: AttentionMetadata | None = None
        hd = k_pool.shape[-1] // self.fmt.block_bytes * 32 if self.fmt.quantized else k_pool.shape[-1]
        self.scale = hd ** -0.5 if scale is None else scale  # the layer's softmax scale
        self.rotate = self.fmt.rotates(hd)
        self.softcap = softcap  # the layer's score soft-capping (Gemma 2): the C kernel does not take it
        self.tail, self.layer = tail, layer  # a 4-bit cache's exact blocks, and this layer's index in them

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("PagedKVCache attends itself: MultiHeadAttention calls attend(), not update()")

    def _write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(self.k_pool, self.v_pool, k[0], v[0], slots, self.fmt)
        if self.tail is not None and self.meta is not None and self.meta.tail_write is not None:
            self.tail.write(self.layer, k[0], v[0], *self.meta.tail_write)

    def _gather(self, tables: torch.Tensor, scratch: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, nb) block ids → K, V of shape (n_kv, B, nb * block_size, hd).

        ``index_select`` copies whole blocks (several times faster than advanced indexing on the
        CPU); ``scratch`` (two buffers shared by all layers of a step) saves allocating them per layer.
        """
        B, nb = tables.shape
        n_kv, _, bs, hd = self.k_pool.shape  # hd: the row's width (its bytes when quantized)
        flat_k, flat_v, idx = self.k_pool.view(n_kv, -1, bs * hd), self.v_pool.view(n_kv, -1, bs * hd), tables.view(-1)
        if scratch is None:
            k, v = flat_k.index_select(1, idx), flat_v.index_select(1, idx)
        else:
            if not scratch:
                scratch += [flat_k.new_empty(n_kv, B * nb, bs * hd), flat_v.new_empty(n_kv, B * nb, bs * hd)]
            k = torch.index_select(flat_k, 1, idx, out=scratch[0])
            v = torch.index_select(flat_v, 1, idx, out=scratch[1])
        return k.view(n_kv, B, nb * bs, hd), v.view(n_kv, B, nb * bs, hd)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (nh, B_d, hd) of the decoding sequences → their attention output (nh, B_d, hd).

        The C kernel reads K/V in place through the block tables (attnkit.quant.native); without it,
        ``compile`` runs the compiled block-table kernel, else the blocks are gathered for bmm.
        """
        assert meta.decode_tables is not None and meta.decode_bias is not None
        if meta.native is None:  # first layer of the step: can the C kernel run it?
            meta.native = NativeDecodeArgs.prepare(meta, q, self.k_pool, self.fmt) or False
        if meta.native:
            return paged_decode_attention_native(q, self.k_pool, self.v_pool, meta.decode_tables, meta.decode_lens,
                                                 meta.decode_starts, meta.native, self.scale,  # type: ignore[arg-type]
                                                 tail=(self.tail, self.layer) if meta.decode_tail is not None else None,
                                                 softcap=self.softcap)
        if meta.fused_gather and self.softcap is None and not self.fmt.quantized:
            return compiled_paged_decode_attention()(q, self.k_pool, self.v_pool, meta.decode_tables, meta.decode_bias,
                                                     self.scale)
        kd, vd = self._gather(meta.decode_tables, meta.scratch)
        if self.fmt.quantized:
            kd, vd = self.fmt.dequantize(kd, q.dtype), self.fmt.dequantize(vd, q.dtype)
            if meta.decode_tail is not None and self.tail is not None:  # each query's own block from its tail slot
                slots, first = meta.decode_tail
                for b in (slots >= 0).nonzero()[:, 0].tolist():
                    t = torch.arange(int(first[b]), int(meta.decode_lens[b]), device=q.device)
                    kd[:, b, t], vd[:, b, t] = self._tail_rows(int(slots[b]), t % self.tail.block_size, q.dtype)
        return decode_attention(q, kd, vd, meta.decode_bias, self.scale, self.softcap)

    def _prefill_exact(self, q: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor, p: PrefillChunk, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """A prompt chunk's attention under the exact-block rule (attnkit.engine.kv_tail), as the C path computes it
        row by row: query i reads the keys of its own block from q8_0 rows (the tail's, or its chunk's own rows
        rounded alike), earlier ones as the pool holds them. q (1, nh, n, hd); kn, vn (1, n_kv, n, hd) the chunk's
        rows as computed; k, v the step's rows as the pool holds them."""
        assert self.tail is not None and p.tail is not None
        n, ctx, bs = p.end - p.start, p.context_len, self.tail.block_size
        c0 = ctx - n  # the first query's cache index
        b0 = c0 // bs * bs
        if ctx == n:
            kq, vq = k[:, :, p.start:p.end], v[:, :, p.start:p.end]
        else:
            kq, vq = self._gather(p.block_table[None])
            kq, vq = (self.fmt.dequantize(x[:, :, :ctx].transpose(0, 1), q.dtype) for x in (kq, vq))
        slot, first = p.tail
        kx = [TAIL_ROW.dequantize(TAIL_ROW.quantize(kn), q.dtype)]  # (1, n_kv, n, hd)
        vx = [TAIL_ROW.dequantize(TAIL_ROW.quantize(vn), q.dtype)]
        if c0 > b0:  # the block's rows before the chunk: from the tail where it holds them, else the pool's
            t = torch.arange(b0, c0, device=q.device)
            tk, tv = self._tail_rows(slot, t % bs, q.dtype)
            held = (t >= first)[:, None]
            kx.insert(0, torch.where(held, tk, kq[0, :, b0:c0])[None])
            vx.insert(0, torch.where(held, tv, vq[0, :, b0:c0])[None])
        i = torch.arange(c0, ctx, device=q.device)[:, None]
        j = torch.arange(ctx, device=q.device)[None, :]
        visible = p.mask if p.mask is not None else j <= i
        own = i // bs * bs
        own = torch.where(own == b0, torch.clamp(own, min=first), own)  # (n, 1): the first key read exactly
        mask = torch.cat((visible & (j < own), (visible & (j >= own))[:, b0:]), dim=1)
        keys, values = torch.cat([kq] + kx, dim=2), torch.cat([vq] + vx, dim=2)
        out, _ = scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), mask=mask, impl="sdpa",
                                              scale=self.scale, softcap=self.softcap)
        return out

    def _tail_rows(self, slot: int, offsets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (n_kv, n, hd) of tail slot ``slot`` at ``offsets`` (n,), as the C kernels read them."""
        assert self.tail is not None
        tk, tv = self.tail.k[self.layer][:, slot, offsets], self.tail.v[self.layer][:, slot, offsets]
        return TAIL_ROW.dequantize(tk, dtype), TAIL_ROW.dequantize(tv, dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, nh, T, hd), new k/v (1, n_kv, T, hd) → attention output (1, nh, T, hd)."""
        if self.rotate:  # rows stored Hadamard-rotated (attnkit.engine.kv_format): q, k, v rotated in, the output back
            return hadamard64(self._attend(hadamard64(q), hadamard64(k), hadamard64(v)))
        return self._attend(q, k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        assert meta is not None, "the model runner sets the step's metadata before the forward"
        self._write(k, v, meta.slots)
        k0, v0 = k, v  # the new rows as computed (the tail's source)
        for rows, queries in meta.observe:
            queries.append(q[0][:, rows])
        if meta.decode_only:
            return self._decode(q[0], meta)[None]
        if self.fmt.quantized:  # the chunks attend to their own K/V as the pool holds them, like cached K/V
            k, v = self.fmt.dequantize(self.fmt.quantize(k), q.dtype), self.fmt.dequantize(self.fmt.quantize(v), q.dtype)
        elif k.dtype != self.k_pool.dtype:
            k, v = k.to(self.k_pool.dtype), v.to(self.v_pool.dtype)
        out = torch.empty_like(q)
        if meta.decode_index is not None:
            out[0][:, meta.decode_index] = self._decode(q[0][:, meta.decode_index], meta)
        for p in meta.prefills:
            qp = q[:, :, p.start:p.end]
            if p.tail is not None and self.tail is not None:
                out[:, :, p.start:p.end] = self._prefill_exact(qp, k0[:, :, p.start:p.end], v0[:, :, p.start:p.end], p, k, v)
                continue
            if p.context_len == p.end - p.start:  # nothing cached before: the chunk's own K/V
                kp, vp = k[:, :, p.start:p.end], v[:, :, p.start:p.end]
            else:
                kp, vp = self._gather(p.block_table[None])
                kp, vp = kp[:, :, :p.context_len].transpose(0, 1), vp[:, :, :p.context_len].transpose(0, 1)
                if self.fmt.quantized:
                    kp, vp = self.fmt.dequantize(kp, q.dtype), self.fmt.dequantize(vp, q.dtype)
            if p.mask is None and self.softcap is None:  # SDPA's own causal mask: no (n, n) boolean mask built or read
                out[:, :, p.start:p.end] = F.scaled_dot_product_attention(
                    qp, kp.to(q.dtype), vp.to(q.dtype), is_causal=True, enable_gqa=qp.shape[1] != kp.shape[1],
                    scale=self.scale)
            else:
                mask = p.mask if p.mask is not None else torch.ones(
                    p.end - p.start, p.context_len, dtype=torch.bool, device=q.device).tril_(p.context_len - (p.end - p.start))
                out[:, :, p.start:p.end], _ = scaled_dot_product_attention(
                    qp, kp.to(q.dtype), vp.to(q.dtype), mask=mask, impl="sdpa", scale=self.scale, softcap=self.softcap)
        return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence: softmax(q·Kᵀ/√d + bias)·V with grouped-query heads, as batched products.

    q (nh, B, hd); k, v (n_kv, B, L, hd); bias (B, L), 0 where a key may be seen and −∞ elsewhere
    (padding of shorter contexts, the sliding window) → (nh, B, hd). The g = nh / n_kv query heads
    that share a KV head form the rows of one (g, hd) × (hd, L) product; no K/V is repeated. For one
    token per sequence this is faster on the CPU than SDPA's flash kernel, which tiles for long queries.
    K/V of another dtype than q (a float16 KV cache under float32 activations) are widened first.
    ``scale`` replaces 1/√d; ``softcap`` c caps the scores to c·tanh(s/c) before the bias (Gemma 2).
    """
    nh, B, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    n_kv, _, L, _ = k.shape
    g = nh // n_kv
    dtype = q.dtype
    if k.dtype != dtype:  # a KV cache of another dtype: compute in the wider one (float32 for float16 vs bfloat16)
        wide = torch.promote_types(dtype, k.dtype)
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
    qg = (q.view(n_kv, g, B, hd).transpose(1, 2) * scale).reshape(n_kv * B, g, hd)  # (n_kv·B, g, hd)
    scores = torch.bmm(qg, k.view(n_kv * B, L, hd).transpose(1, 2))  # (n_kv·B, g, L)
    if scores.dtype != torch.float32:
        scores = scores.float()
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores.view(n_kv, B, g, L).add_(bias[None, :, None, :])
    probs = torch.softmax(scores, dim=-1)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    out = torch.bmm(probs, v.view(n_kv * B, L, hd)).view(n_kv, B, g, hd).transpose(1, 2).reshape(nh, B, hd)
    return out if out.dtype == dtype else out.to(dtype)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                           bias: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`decode_attention` reading K/V through the block tables, written for torch.compile.

    q (nh, B, hd); pools (n_kv, num_blocks, block_size, hd); tables (B, nb); bias (B, nb·block_size).
    Compiled, the gather ``k_pool[:, tables[b, t // bs], t % bs]`` becomes an indirect load inside
    the score loop: no copy of the context is made. (Eagerly it would materialise the gather.)
    """
    nh, B, hd = q.shape
    n_kv, _, bs, _ = k_pool.shape
    g = nh // n_kv
    t = torch.arange(tables.shape[1] * bs, device=q.device)
    blk, off = tables[:, t // bs], t % bs  # (B, L)
    k, v = k_pool[:, blk, off].float(), v_pool[:, blk, off].float()  # (n_kv, B, L, hd)
    qg = q.view(n_kv, g, B, hd).transpose(1, 2).float() * (hd ** -0.5 if scale is None else scale)  # (n_kv, B, g, hd)
    scores = (qg[:, :, :, None, :] * k[:, :, None]).sum(-1) + bias[None, :, None, :]  # (n_kv, B, g, L)
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * v[:, :, None]).sum(-2)  # (n_kv, B, g, hd)
    return out.transpose(1, 2).reshape(nh, B, hd).to(q.dtype)


@functools.cache
def compiled_paged_decode_attention():
    """:func:`paged_decode_attention` compiled once per process (dynamic shapes: any batch, any length)."""
    return torch.compile(paged_decode_attention, dynamic=True)


def native_kernel(q: torch.Tensor, k_pool: torch.Tensor, fmt: KVFormat | None = None):
    """The C paged attention (``ak_paged_attention_kv`` for the pool's row format) for float32 queries over a float32,
    float16, q8_0 or q4_0 pool on the CPU, else None. It is called as (q, k_pool, v_pool, tables, lens, starts, out,
    B, nh, …, tail=, softcap=)."""
    from ..kernels import library

    lib = library()
    fmt = fmt or kv_format(k_pool.dtype)
    if lib is None or q.dtype != torch.float32 or q.device.type != "cpu" or fmt.code < 0:
        return None
    return functools.partial(_paged_attention_kv, lib, fmt.code)


def _paged_attention_kv(lib, kv_type: int, q, k_pool, v_pool, *rest, tail=None, softcap: float | None = None) -> int:
    return lib.ak_paged_attention_kv(q, k_pool, v_pool, kv_type, *rest, tail, softcap or 0.0)


class _Tail(ctypes.Structure):  # kernels/decode.h's ak_kv_tail
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("slots", ctypes.c_int), ("slot", ctypes.c_void_p),
                ("exact_from", ctypes.c_void_p)]


def tail_arg(tail: KVTail | None, rows: tuple[torch.Tensor, torch.Tensor] | None, keep: list,
             layer: int | None = None):
    """The C kernels' ``ak_kv_tail *`` for the query rows' (slot, first exact key) ``rows`` (contiguous int64):
    ``layer``'s slots, or none (the decode step passes each layer's own); None without exact blocks. ``keep`` holds
    the struct it points to."""
    if tail is None or rows is None:
        return None
    k, v = (None, None) if layer is None else (tail.k[layer].data_ptr(), tail.v[layer].data_ptr())
    arg = _Tail(k, v, tail.slots, rows[0].data_ptr(), rows[1].data_ptr())
    keep.append(arg)
    return ctypes.byref(arg)


class NativeDecodeArgs:
    """What the C paged attention needs from one step's metadata, prepared once for all layers."""

    def __init__(self, kernel, tables: torch.Tensor, lens: torch.Tensor, starts: torch.Tensor, nh: int, n_kv: int,
                 bs: int) -> None:
        self.kernel, self.keep = kernel, (tables.contiguous(), lens.contiguous(), starts.contiguous())
        self.threads = torch.get_num_threads()
        self.scratch = torch.empty(self.threads * (nh // n_kv) * tables.shape[1] * bs)  # the scores
        self.ptrs = [t.data_ptr() for t in self.keep]
        self.B, self.max_nb = tables.shape
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None  # the rows' exact blocks (AttentionMetadata.decode_tail)

    @classmethod
    def prepare(cls, meta: AttentionMetadata, q: torch.Tensor, k_pool: torch.Tensor,
                fmt: KVFormat | None = None) -> NativeDecodeArgs | None:
        """None when the kernel does not apply: not built, not float32 queries over a pool it reads (float32,
        float16, q8_0, q4_0) on the CPU, or compile=True (on float pools)."""
        fmt = fmt or kv_format(k_pool.dtype)
        if (meta.fused_gather and not fmt.quantized) or meta.decode_lens is None or meta.decode_starts is None:
            return None
        kernel = native_kernel(q, k_pool, fmt)
        if kernel is None:
            return None
        assert meta.decode_tables is not None
        args = cls(kernel, meta.decode_tables, meta.decode_lens, meta.decode_starts, q.shape[0], k_pool.shape[0],
                   k_pool.shape[2])
        args.tail = meta.decode_tail
        return args


def paged_decode_attention_native(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                                  lens: torch.Tensor, starts: torch.Tensor,
                                  prepared: NativeDecodeArgs | None = None, scale: float | None = None,
                                  fmt: KVFormat | None = None, tail: tuple[KVTail, int] | None = None,
                                  softcap: float | None = None) -> torch.Tensor | None:
    """One query token per sequence over its K/V read in place through the block tables (C kernel).

    q (nh, B, hd) float32; pools (n_kv, num_blocks, block_size, width) float32 or float16 rows, or q8_0/q4_0
    rows of ``fmt`` (width their bytes), contiguous; tables
    (B, nb), lens and starts (B,) int64: sequence b attends to keys starts[b] ≤ j < lens[b]. Returns (nh, B, hd),
    or None when the kernel is not available for these inputs (then the caller gathers and uses bmm).
    ``prepared``: the step's arguments made once (:class:`NativeDecodeArgs`), shared by every layer. ``tail``: the
    exact blocks and this layer's index (a q8_0/q4_0 pool; the rows' slots in ``prepared.tail``). ``softcap``: the
    scores soft-capped, tanh(s / c) · c, before the softmax (Gemma 2).
    """
    nh, B, hd = q.shape
    n_kv, num_blocks, bs, _ = k_pool.shape
    if nh % n_kv:
        raise ValueError(f"paged attention: {nh} query heads are not a multiple of {n_kv} KV heads")
    if prepared is None:
        kernel = native_kernel(q, k_pool, fmt)
        if kernel is None:
            return None
        prepared = NativeDecodeArgs(kernel, tables, lens, starts, nh, n_kv, bs)
    qb = q.transpose(0, 1).contiguous()  # (B, nh, hd)
    out = torch.empty_like(qb)
    t, ln, st = prepared.ptrs
    extra, keep = {}, []  # keep: what the tail argument points to, alive through the call
    if tail is not None:
        extra["tail"] = tail_arg(tail[0], prepared.tail, keep, tail[1])
    if softcap is not None:  # Gemma 2: the scores soft-capped before the softmax
        extra["softcap"] = softcap
    prepared.kernel(qb.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), t, ln, st, out.data_ptr(), B, nh, n_kv, hd,
                    bs, num_blocks, prepared.max_nb, hd ** -0.5 if scale is None else scale, prepared.scratch.data_ptr(),
                    prepared.threads, **extra)
    return out.transpose(0, 1)
