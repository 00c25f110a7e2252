"""Gradients through a frozen quantized weight: the backward pass QLoRA needs (Dettmers et al. 2023, §3).

    y = x·Ŵᵀ + b        ∂L/∂x = ∂L/∂y · Ŵ        (Ŵ = dequant(Q); Q and b get no gradient)

The base stays quantized — GGUF blocks (:class:`~attnkit.quant.native.GGUFBlockLinear`) or attnkit's int8/int4
(:class:`~attnkit.quant.base.QuantLinear`) — and each product dequantizes Ŵ a tile of output rows at a time into
one reused buffer, so no layer, and never the model, exists in float at once. Nothing is saved for backward but
the layer itself: the adapters around the layer (LoRA's A and B) keep the activations they need.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..nn.scratch import reused

TILE_ELEMS = 1 << 22  # weights dequantized at a time (16 MiB of float32): a 128k-vocabulary head in ~30 tiles


class RowDequantizing(Protocol):
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor: ...


def tile_rows(layer: RowDequantizing) -> int:
    """Rows per tile: a multiple of 64 (GGUF's interleaved layouts keep rows in groups of 4 or 16), at least 64."""
    return max(64, TILE_ELEMS // layer.in_features // 64 * 64)


def _tile(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (n, k) view of a buffer of ``dtype`` reused by every tile of every layer (:mod:`attnkit.nn.scratch`;
    training runs one thread of products at a time)."""
    return reused(f"tile.{dtype}", (n, k), dtype)


def tiles(layer: RowDequantizing, dtype: torch.dtype = torch.float32):
    """(start, stop, Ŵ[start:stop]) for each tile of output rows, dequantized into the one reused buffer of
    ``dtype`` (float32, or bfloat16 for the products of a bf16 run)."""
    n, k = layer.out_features, layer.in_features
    rows = tile_rows(layer)
    for r in range(0, n, rows):
        e = min(n, r + rows)
        yield r, e, layer.dequantize_rows(r, e, _tile(e - r, k, dtype))


def tiled_product(layer: RowDequantizing, x: torch.Tensor) -> torch.Tensor:
    """x·Ŵᵀ (no bias): x (M, in) float32 or bfloat16 → (M, out) in x's dtype, Ŵ dequantized tile by tile."""
    if torch.compiler.is_compiling():  # a traced graph takes no out= view of a column block
        return torch.cat([torch.mm(x, w.t()) for _, _, w in tiles(layer, x.dtype)], dim=1)
    y = x.new_empty(x.shape[0], layer.out_features)  # (M, out)
    for r, e, w in tiles(layer, x.dtype):
        torch.mm(x, w.t(), out=y[:, r:e])
    return y


def tiled_input_grad(layer: RowDequantizing, gy: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = ∂L/∂y · Ŵ: gy (M, out) float32 or bfloat16 → (M, in) float32, summed over tiles of Ŵ's rows (in
    float32: a bfloat16 tile's product is added to the float32 sum)."""
    gx = gy.new_zeros(gy.shape[0], layer.in_features, dtype=torch.float32)  # (M, in)
    for r, e, w in tiles(layer, gy.dtype):
        if gy.dtype == torch.float32:
            gx.addmm_(gy[:, r:e], w)
        else:
            gx.add_(torch.mm(gy[:, r:e], w))
    return gx


class _FrozenProduct(torch.autograd.Function):
    """Under CPU autocast the products run in its dtype (bf16 tiles: oneDNN's bf16 products, ~2× float32's on
    bf16 hardware), else in float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: RowDequantizing) -> torch.Tensor:  # type: ignore[override]
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        ctx.layer, ctx.dtype, ctx.dt = layer, x.dtype, dt
        y = tiled_product(layer, x.to(dt))
        return y if dt != torch.float32 else y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        return tiled_input_grad(ctx.layer, gy.to(ctx.dt).contiguous()).to(ctx.dtype), None


def frozen_linear(layer: RowDequantizing, x: torch.Tensor) -> torch.Tensor:
    """y = x·Ŵᵀ + b for x (..., in) that needs a gradient; the layer's weight and bias stay frozen."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"{type(layer).__name__}: input has {x.shape[-1]} features, expected {layer.in_features}")
    y = _FrozenProduct.apply(x.reshape(-1, layer.in_features), layer)  # (M, out)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)
