"""The engine's prompt product on GGUF blocks (attnkit/kernels/gemm.c): equal to gguf's dequantized weights times the
activations quantized as llama.cpp's q8_K / q8_0 (up to float summation order), to the decode kernel within
float rounding, the same for a row whatever rows share its call (batch invariance), exact at the extremes of the
integer sums, and chosen only where it applies."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from attnkit.quant.native import BLOCK_TYPES, GGUFBlockLinear, dequantize_reference, library, random_blocks, \
    set_dense_dtype
from attnkit.quant.row_kernel import rows_are

from q8_reference import product as kernel_reference

KINDS = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _gemm_layer(kind: str, n: int = 48, k: int = 512, seed: int = 0) -> GGUFBlockLinear:
    layer = GGUFBlockLinear(random_blocks(kind, n, k, seed=seed), kind, k)
    if not layer.gemm_shape():
        pytest.skip(f"this build has no integer prompt product for {kind} (it needs AVX-512 VNNI)")
    return layer


def _gemm(layer: GGUFBlockLinear, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    lib = library()
    m = x.shape[0]
    y = torch.empty(m, layer.out_features)
    scratch = torch.empty(m * layer.in_features // 32 * 40, dtype=torch.uint8)
    rc = lib.ak_gemm(layer.kernel_kind, layer.blocks.data_ptr(), x.contiguous().data_ptr(), y.data_ptr(), m,
                     layer.out_features, layer.in_features, scratch.data_ptr(), threads)
    assert rc == 0
    return y


SHORT_UNITS = [(kind, k) for kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") for k in (576, 96)]


@pytest.mark.parametrize("kind,k", [(kind, 512) for kind in KINDS] + SHORT_UNITS)
def test_gemm_equals_gguf_weights_times_quantized_activations(kind: str, k: int) -> None:
    """k = 576 and 96: the 32-weight types' rows of any multiple of 32 inputs (the last panel unit short: the
    default SmolLM2-135M's 576-wide layers)."""
    layer = _gemm_layer(kind, n=48, k=k, seed=1)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(2))
    ref = kernel_reference(x.numpy(), layer.row_blocks().numpy(), kind, k)
    y = _gemm(layer, x).double().numpy()
    assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max()
    # and the decode kernel (same activation quantization) agrees within float rounding
    assert torch.allclose(torch.from_numpy(y).float(), layer.kernel_product(x), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("kind,k", [(kind, 512) for kind in KINDS] + SHORT_UNITS[:2])
def test_gemm_rows_do_not_depend_on_the_batch_or_threads(kind: str, k: int) -> None:
    layer = _gemm_layer(kind, n=64, k=k, seed=3)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(4))
    full = _gemm(layer, x)
    for rows in ([5], [0, 1, 2], [3, 4, 5, 6, 7], list(range(9, 13))):
        assert torch.equal(_gemm(layer, x[rows], threads=1), full[rows])


@pytest.mark.parametrize("kind", KINDS)
def test_gemm_is_exact_at_the_extremes_of_its_integer_sums(kind: str) -> None:
    """Every quant and scale byte at its largest (0xff) and activations at ±max: the int32 sums of a super-block
    reach their largest magnitudes; an overflow would show as a wrong sign or size."""
    t = BLOCK_TYPES[kind]
    n, k = 16, 512
    b = np.full((n, k // t.block_elems, t.block_bytes), 0xFF, dtype=np.uint8)
    for off in t.halves:
        b[..., off:off + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    layer = GGUFBlockLinear(torch.from_numpy(b.reshape(n, -1)), kind, k)
    if not layer.gemm_shape():
        pytest.skip(f"this build has no integer prompt product for {kind}")
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    ref = kernel_reference(x.numpy(), layer.row_blocks().numpy(), kind, k)
    y = _gemm(layer, x).double().numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_prompt_rows_take_the_gemm_only_where_it_applies() -> None:
    layer = _gemm_layer("Q4_K", n=32, k=256)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(5))
    with rows_are("prompt"):
        y = layer(x)
    assert torch.equal(y, _gemm(layer, x))
    set_dense_dtype(layer, torch.float32, int8_prompts=False)  # an explicit matmul_dtype: the dense product
    assert not layer.int8_prompts
    with rows_are("prompt"):
        assert torch.allclose(layer(x), x @ layer.dequantize().t(), atol=1e-5)
    head = _gemm_layer("Q4_K", n=32, k=256)
    head.dense_for_prompts = False  # an output head: a prompt's few sampled rows stay on the decode kernel
    assert not head.int8_prompts
    with rows_are("prompt"):
        assert torch.equal(head(x), head.kernel_product(x))
    expert = _gemm_layer("Q4_K", n=32, k=256)
    expert.dense_for_prompts, expert.int8_prompts = False, True  # as the loader sets an expert's layers
    with rows_are("prompt"):
        assert torch.equal(expert(x[:5]), _gemm(expert, x[:5]))
    with rows_are("short-prompt"):  # a short prompt's rows stay on the decode kernel
        assert torch.equal(expert(x[:5]), expert.kernel_product(x[:5]))
    fresh = _gemm_layer("Q4_K", n=32, k=256)
    with rows_are("short-prompt"):  # a short prompt's rows take it too (but an expert's, above)
        assert torch.equal(fresh(x[:5]), _gemm(fresh, x[:5]))
    with rows_are("generated"):  # decode rows never take it
        assert torch.equal(layer(x[:3]), layer.kernel_product(x[:3]))


def test_gemm_refuses_what_it_does_not_multiply() -> None:
    lib = library()
    if lib is None:
        pytest.skip("no C compiler: the kernels could not be built")
    rows = GGUFBlockLinear(random_blocks("Q4_0", 32, 256), "Q4_0", 256, interleaved=False)  # GGUF's row layout
    assert not rows.gemm_shape() and not rows.int8_prompts
    with pytest.raises(ValueError, match="no integer prompt product"):
        rows.int8_prompts = True
    narrow = GGUFBlockLinear(random_blocks("Q4_K", 12, 256), "Q4_K", 256)  # 12 rows: not a panel of 16
    assert not narrow.gemm_shape()
    assert lib.ak_gemm_takes(narrow.kernel_kind, 32, 96) == 0  # a K-quant's rows are whole super-blocks of 256
    short = GGUFBlockLinear(random_blocks("Q8_0", 32, 96), "Q8_0", 96)  # a 32-weight type: any multiple of 32
    # (an AVX2 build has no integer prompt product at all: gemm.c is AVX-512 VNNI's)
    assert short.gemm_shape() == bool(lib.ak_gemm_available(short.kernel_kind))
    assert lib.ak_gemm_takes(short.kernel_kind, 32, 80) == 0
    x = torch.randn(4, 256)
    y = torch.empty(4, 32)  # room for the widest: a refusal writes nothing
    s = torch.empty(4 * 8 * 40, dtype=torch.uint8)
    vp = ctypes.c_void_p
    for layer, n, k in ((rows, 32, 256), (narrow, 12, 256)):
        assert lib.ak_gemm(layer.kernel_kind, vp(layer.blocks.data_ptr()), vp(x.data_ptr()), vp(y.data_ptr()), 4, n,
                           k, vp(s.data_ptr()), 1) == 1


def test_a_fused_layer_keeps_the_products_its_parts_were_set_to() -> None:
    """An expert's gate and up, set to the integer kernel for prompts, fused into one layer stay so (they were
    fused with the defaults before: a dense product decoding the whole expert for a few rows)."""
    gate, up = GGUFBlockLinear(random_blocks("Q4_K", 32, 256, seed=1), "Q4_K", 256), \
        GGUFBlockLinear(random_blocks("Q4_K", 32, 256, seed=2), "Q4_K", 256)
    for part in (gate, up):
        part.dense_for_prompts = False
        part.dense_dtype = torch.bfloat16
        if part.gemm_shape():
            part.int8_prompts = True
    fused = GGUFBlockLinear.cat_out([gate, up])
    assert fused.dense_for_prompts is False and fused.dense_dtype == torch.bfloat16
    assert fused.int8_prompts == gate.gemm_shape()
    gate.dense_for_prompts = True  # parts that disagree: the fused layer takes the defaults
    assert GGUFBlockLinear.cat_out([gate, up])._dense_for_prompts is None


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q4_K", "Q5_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_generated_rows_get_the_same_bits_from_any_batch(kind: str) -> None:
    """From 4 rows on (12 for Q4_K and Q5_K, 16 for the 32-weight types), ak_gemv hands a batch of a type with the
    product in its decode kernel's order to that product (kernels/gemm.c, ak_gemm_x4): each row must still get the
    bits the decode kernel gives it alone."""
    layer = _gemm_layer(kind, n=64, k=512, seed=6)
    x = torch.randn(21, 512, generator=torch.Generator().manual_seed(7))
    batch = layer.kernel_product(x)  # 21 rows: the matrix product
    for rows in ([0], [1, 2], [3, 4, 5], [6, 7, 8, 9], list(range(10, 21))):
        assert torch.equal(layer.kernel_product(x[rows]), batch[rows])
    ref = kernel_reference(x.numpy(), layer.row_blocks().numpy(), kind, 512)
    assert np.abs(batch.double().numpy() - ref).max() <= 2e-5 * np.abs(ref).max()
