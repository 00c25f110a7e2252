"""Every GGUF block type attnkit multiplies natively (attnkit.quant.native.BLOCK_TYPES, attnkit/kernels/*.c), in
GGUF's row layout and interleaved in fours, on random valid blocks (random quant and scale bytes, moderate fp16
d / dmin): decoding equals gguf-py's bit for bit; the integer products equal the product with the activations
rounded to 8 bits per weight block (32, or 256 for the K-quants) up to float rounding; a row's result never depends on the other rows of the
call nor on the thread count; the embedding rows are the decoded rows; bad input is named. The kernels also
build without warnings for x86-64 (portable C), Haswell (AVX2) and Ice Lake (AVX-512 without BF16), and those
builds give the same answers."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from attnkit import kernels
from attnkit.kernels import ops
from attnkit.quant import native
from q8_reference import product as kernel_reference, q8_activations

from attnkit.quant.native import (BLOCK_TYPES, NATIVE_TYPES, GGUFBlockEmbedding, GGUFBlockLinear, has_x4,
                                  interleave, deinterleave)

TYPES = sorted(NATIVE_TYPES, key=lambda t: BLOCK_TYPES[t].ggml_id)
needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels could not be built")


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    return native.random_blocks(kind, n, k, seed).numpy()


def reference(blocks: np.ndarray, kind: str, k: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks, GGMLQuantizationType[kind]).reshape(len(blocks), k))


def width(kind: str) -> int:
    return 512 if BLOCK_TYPES[kind].block_elems == 256 else 160


def layouts(lib=None):
    """(type, interleaved) pairs the kernels have: GGUF's row layout always, four rows interleaved where built."""
    return [(t, x4) for t in TYPES for x4 in (False, True) if not x4 or has_x4(t)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                                                     b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def check_type(kind: str, x4: bool, n: int = 80, seed: int = 0) -> None:
    """Decoding (float32, bf16), embedding rows and products against the references, for one type and layout."""
    k = width(kind)
    blocks = random_blocks(kind, n, k, seed)
    ref = reference(blocks, kind, k)
    layer = GGUFBlockLinear(torch.from_numpy(blocks), kind, k, interleaved=x4)
    assert layer.interleaved == x4 and torch.equal(layer.row_blocks(), torch.from_numpy(blocks))
    assert same_bits(layer.dequantize(), ref)  # bit for bit, signed zeros included
    assert same_bits(layer.dequantize(torch.bfloat16), ref.bfloat16())  # rounded to nearest even, as torch
    ids = torch.tensor([[n - 1, 0, 5], [5, 2, n // 2]])
    assert same_bits(GGUFBlockEmbedding(layer)(ids), ref[ids])
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(seed))
    y = layer.kernel_product(x)
    exact = torch.from_numpy(kernel_reference(x.numpy(), blocks, kind, k))  # only summation order differs
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-6
    tol = 0.012 if BLOCK_TYPES[kind].block_elems == 32 else 0.02  # 8-bit activations, one scale per 32 / 256 values
    assert ((y - x @ ref.T).norm() / (x @ ref.T).norm()).item() < tol


@needs_kernel
@pytest.mark.parametrize("kind,x4", layouts())
def test_decoding_products_and_embedding_rows(kind: str, x4: bool) -> None:
    check_type(kind, x4)


@needs_kernel
@pytest.mark.parametrize("kind", TYPES)
def test_activation_rows_are_llama_cpps_q8_blocks(kind: str) -> None:
    """The 8-bit activation rows every product reads are llama.cpp's own (x86 quantize_row_q8_0 / q8_1 / q8_K)
    bit for bit — quants, fp16 d (and q8_1's fp16 s) of the 32-weight types, float d of the K-quants — so that a GGUF
    file's products round as in llama.cpp: rows of outliers, exact halves, zeros and tiny values included."""
    lib = kernels.library()
    k = width(kind)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, k, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1e-6])[:, None]
    x[3, :32] = 0.0  # an all-zero block: d = 0, q = 0
    x[3, 32:64] = torch.arange(32) - 15.5  # x · 127 / 16 at halves: ties to even
    x[4, 5] = 500.0  # an outlier sets its block's (or super-block's) scale
    x = x.contiguous()
    scratch = torch.zeros(len(x) * (k // 32) * 40, dtype=torch.uint8)
    assert lib.ak_quantize_act(BLOCK_TYPES[kind].ggml_id, x.data_ptr(), len(x), k, scratch.data_ptr()) == 0
    rows = scratch.view(len(x), -1)
    q = rows[:, :k].view(torch.int8).numpy()
    d = rows[:, k:k + k // 32 * 4].contiguous().view(torch.float32).numpy()
    s = rows[:, k + k // 32 * 4:].contiguous().view(torch.float32).numpy()
    want_q, want_d, want_s = q8_activations(x.numpy(), BLOCK_TYPES[kind].block_elems)
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d.astype(np.float32))
    if kind in ("Q4_1", "Q5_1"):  # q8_1's s; the others' s is d·Σq (exact for the 32-weight types' fp16 d)
        assert np.array_equal(s, want_s.astype(np.float32))
    else:
        assert np.array_equal(s, (d * q.reshape(len(x), -1, 32).sum(-1).astype(np.float32)).astype(np.float32))


@needs_kernel
@pytest.mark.parametrize("kind,x4", layouts())
def test_a_rows_result_does_not_depend_on_the_batch(kind: str, x4: bool) -> None:
    """Batch invariance: row r of ak_gemv bit for bit the same for m = 1..70, any companions, 1 or 2 threads."""
    k, n = width(kind), 80  # five panels of 16 rows (groups of 4 or 16)
    layer = GGUFBlockLinear(torch.from_numpy(random_blocks(kind, n, k, 1)), kind, k, interleaved=x4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, k, generator=g) * torch.rand(70, 1, generator=g) * 3
    full = layer.kernel_product(x)
    threads = torch.get_num_threads()
    try:
        for m in (1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 64, 70):
            rows = torch.randperm(70, generator=g)[:m]
            torch.set_num_threads(1 + m % 2)
            assert torch.equal(layer.kernel_product(x[rows]), full[rows]), m
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", TYPES)
def test_interleaving_is_a_permutation_within_groups_of_rows(kind: str) -> None:
    k, R = width(kind), native.group_rows(kind)
    blocks = torch.from_numpy(random_blocks(kind, 2 * R, k, 2))
    packed = interleave(blocks, kind)
    assert packed.shape == blocks.shape and not torch.equal(packed, blocks)
    for g in range(2):
        rows = slice(R * g, R * g + R)
        assert torch.equal(packed[rows].flatten().sort().values, blocks[rows].flatten().sort().values)
    assert torch.equal(deinterleave(packed, kind), blocks)


def test_read_only_blocks_are_never_written(tmp_path) -> None:
    """The loader may hand over a read-only mapping of the file: layers read it, or repack into a new tensor."""
    for kind in ("Q4_K", "Q6_K", "Q8_0"):
        k = width(kind)
        src = random_blocks(kind, 16, k, 3)
        path = tmp_path / f"{kind}.bin"
        src.tofile(path)
        mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=src.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "The given NumPy array is not writable"
            blocks = torch.from_numpy(mapped)
        for x4 in {False, has_x4(kind)}:
            layer = GGUFBlockLinear(blocks, kind, k, interleaved=x4)
            y = layer(torch.randn(2, k))
            assert torch.isfinite(y).all() and torch.equal(layer.dequantize(), reference(src, kind, k))
        assert np.array_equal(np.fromfile(path, dtype=np.uint8).reshape(src.shape), src)


def test_without_the_kernels_every_type_falls_back_to_gguf_py(monkeypatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    for kind in TYPES:
        k = width(kind)
        blocks = random_blocks(kind, 8, k, 4)
        ref = reference(blocks, kind, k)
        layer = GGUFBlockLinear(torch.from_numpy(blocks), kind, k)
        assert not layer.interleaved
        assert same_bits(layer.dequantize(), ref) and torch.equal(layer.dequantize(torch.bfloat16), ref.bfloat16())
        x = torch.randn(3, k)
        torch.testing.assert_close(layer(x), x @ ref.T)
        assert torch.equal(GGUFBlockEmbedding(layer)(torch.tensor([7, 1])), ref[[7, 1]])


def test_bad_inputs_name_the_type_and_shapes() -> None:
    q4k = torch.from_numpy(random_blocks("Q4_K", 4, 512))
    with pytest.raises(ValueError, match="'Q2_K' has no kernel.*Q4_K"):
        GGUFBlockLinear(q4k, "Q2_K", 512)
    with pytest.raises(ValueError, match=r"Q4_K: in_features \(320\) must be a multiple of the block size 256"):
        GGUFBlockLinear(q4k, "Q4_K", 320)
    with pytest.raises(ValueError, match=r"Q6_K blocks for 512 inputs must be uint8 of shape \(out, 420\), got torch.uint8 \(4, 288\)"):
        GGUFBlockLinear(q4k, "Q6_K", 512)
    with pytest.raises(ValueError, match=r"shape \(out, 288\), got torch.int8"):
        GGUFBlockLinear(q4k.view(torch.int8), "Q4_K", 512)
    with pytest.raises(ValueError, match=f"multiple of {native.group_rows('Q4_K')} rows"):
        GGUFBlockLinear(q4k[:3], "Q4_K", 512, interleaved=True)
    q6k = GGUFBlockLinear(torch.from_numpy(random_blocks("Q6_K", 4, 512)), "Q6_K", 512)
    q4k_256 = GGUFBlockLinear(torch.from_numpy(random_blocks("Q4_K", 4, 256)), "Q4_K", 256)
    with pytest.raises(ValueError, match=r"share their input size.*Q4_K \(4×256\), Q6_K \(4×512\)"):
        GGUFBlockLinear.cat_out([q4k_256, q6k])
    fused = GGUFBlockLinear.cat_out([q6k, q6k])
    assert fused.kind == "Q6_K" and torch.equal(fused.row_blocks(), torch.cat([q6k.row_blocks()] * 2))


@needs_kernel
def test_the_library_agrees_with_the_table() -> None:
    import ctypes

    lib = native._kernels()
    e, b = ctypes.c_int(), ctypes.c_int()
    for t in BLOCK_TYPES.values():
        assert lib.ak_type_info(t.ggml_id, ctypes.byref(e), ctypes.byref(b)) == 0 and (e.value, b.value) == (t.block_elems, t.block_bytes)
    assert lib.ak_type_info(10, None, None) == -1  # Q2_K: no kernel
    assert lib.ak_gemv(10, None, None, None, 1, 4, 256, None, 1) == 1


def test_a_newer_amd_core_than_the_compiler_knows_is_tuned_generic() -> None:
    """GCC 12.2's -march=native on a Zen 4/5 tunes for znver3 (a core without AVX-512), whose cost model schedules
    the 512-bit kernels worse: the build asks for -mtune=generic there, and only there."""
    avx512 = frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert kernels.tune_override("znver3", avx512) == "generic"
    assert kernels.tune_override("znver2", avx512) == "generic"
    assert kernels.tune_override("znver3", frozenset({"avx2"})) is None  # a real Zen 3: its own tuning
    assert kernels.tune_override("sapphirerapids", avx512) is None
    assert kernels.tune_override(None, avx512) is None  # a compiler that does not say (clang)
    assert not any(f.startswith("-mtune") for f in kernels.compile_flags("x86-64"))  # only for -march=native
    tune = kernels.tune_override(kernels.native_tune(), kernels.cpu_flags())
    assert ("-mtune=" + tune in kernels.compile_flags("native")) if tune else not any(
        f.startswith("-mtune") for f in kernels.compile_flags("native"))


def test_a_named_target_limits_the_cpu_flags_to_its_extensions(monkeypatch) -> None:
    """$ATTNKIT_MARCH=x86-64-v3 on an AVX-512 machine: attnkit chooses its paths as on an AVX2 machine (no bf16
    products, no 512-bit training kernels), matching the kernels that target builds."""
    has = kernels.march_simd("x86-64-v3")
    if has is None:
        pytest.skip("no C compiler to ask")
    assert {"avx2", "fma", "f16c"} <= has and not any(f.startswith("avx512") for f in has)
    assert kernels.march_simd("no-such-target") is None
    before, outer = kernels.cpu_flags(), os.environ.get("ATTNKIT_MARCH")  # (this run may itself name a target)
    try:
        monkeypatch.setenv("ATTNKIT_MARCH", "native")
        kernels.cpu_flags.cache_clear()
        native_flags = kernels.cpu_flags()
        monkeypatch.setenv("ATTNKIT_MARCH", "x86-64-v3")
        kernels.cpu_flags.cache_clear()
        flags = kernels.cpu_flags()
        assert not any(f.startswith(("avx512", "amx")) for f in flags) and "avx_vnni" not in flags
        assert (native_flags - flags) <= {f for f in native_flags if f.startswith(("avx512", "amx")) or f == "avx_vnni"}
        assert "avx2" in flags or "avx2" not in native_flags
        assert not kernels.native_bf16()
    finally:
        if outer is None:
            monkeypatch.delenv("ATTNKIT_MARCH", raising=False)
        else:
            monkeypatch.setenv("ATTNKIT_MARCH", outer)
        kernels.cpu_flags.cache_clear()
    assert kernels.cpu_flags() == before


def _build(march: str) -> "kernels.ctypes.CDLL":
    """The kernels built for ``march`` with -Wall -Wextra -Werror (cached by source), loaded."""
    src = b"".join(p.read_bytes() for p in kernels.SOURCES + kernels.HEADERS)
    so = kernels.cache_dir() / f"kernels-test-{march}-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(".tmp.so")
        try:
            kernels.build(tmp, march, ("-Wall", "-Wextra", "-Werror"))
        except subprocess.CalledProcessError as e:
            pytest.fail(f"-march={march}: {e.stderr.decode(errors='replace')[:2000]}")
        tmp.replace(so)
    return kernels.load(so)


@needs_kernel
@pytest.mark.parametrize("march,flag", [("x86-64", None), ("haswell", "avx2"), ("icelake-server", "avx512_vnni")])
def test_other_instruction_sets_build_cleanly_and_agree(march: str, flag: str | None, monkeypatch) -> None:
    """Portable C, AVX2 and AVX-512 without BF16 (the latter two run where this CPU has them)."""
    lib = _build(march)
    if flag is not None and flag not in kernels.cpu_flags():
        pytest.skip(f"built; this CPU has no {flag} to run it")
    assert lib.ak_x4_available() == (march != "x86-64")  # AVX2 interleaves every type but Q6_K
    monkeypatch.setattr(native, "library", lambda: lib)
    monkeypatch.setattr(ops, "library", lambda: lib)  # the operators' kernels too
    for kind, x4 in layouts():
        check_type(kind, x4, n=16, seed=5)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(7)) * torch.tensor([1e-4, 1.0, 40.0])[:, None]
    for kind in TYPES:  # the activation rows: llama.cpp's, bit for bit, in every build (round_to_half's C path)
        ours, native_rows = (torch.zeros(3 * 512 // 32 * 40, dtype=torch.uint8) for _ in range(2))
        for library, rows in ((lib, ours), (kernels.library(), native_rows)):
            assert library.ak_quantize_act(BLOCK_TYPES[kind].ggml_id, x.data_ptr(), 3, 512, rows.data_ptr()) == 0
        assert torch.equal(ours, native_rows), kind
    kind, k = "Q6_K", 512  # batch invariance on this build too
    layer = GGUFBlockLinear(torch.from_numpy(random_blocks(kind, 8, k, 6)), kind, k)
    x = torch.randn(9, k)
    full = layer.kernel_product(x)
    assert all(torch.equal(layer.kernel_product(x[:m]), full[:m]) for m in (1, 4, 5))


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_1"])
def test_prompt_rows_take_the_product_the_type_is_faster_with(kind: str, monkeypatch) -> None:
    """The engine's prompt rows: the dense product where bf16 is native or the integer product is the slower one
    (the row layout of a type without BlockType.integer_prompts: the K-quants' and every interleaved product are
    faster than float32 BLAS on AVX2), else the integer kernel; generated rows always take the integer kernel."""
    from attnkit.quant.row_kernel import rows_are

    for bf16, x4 in itertools.product((False, True), (False, True) if has_x4(kind) else (False,)):
        monkeypatch.setattr(native, "native_bf16", lambda: bf16)
        k = width(kind)
        rows = 16 if x4 and native.group_rows(kind) == 16 else 8  # 8: short of a gemm.c panel (16 rows)
        layer = GGUFBlockLinear(torch.from_numpy(random_blocks(kind, rows, k, 3)), kind, k, interleaved=x4)
        x = torch.randn(20, k, generator=torch.Generator().manual_seed(3))
        integer = layer.kernel_product(x)
        dense = x @ layer.dequantize().T
        with rows_are("prompt"):
            y = layer(x)
        want_integer = (BLOCK_TYPES[kind].integer_prompts or layer.interleaved) and not bf16
        assert layer.dense_for_prompts == (not want_integer)
        assert layer.int8_prompts == (rows == 16)  # a whole panel: gemm.c's integer product, whatever bf16
        assert torch.equal(y, integer) if want_integer or layer.int8_prompts else torch.allclose(y, dense, rtol=1e-4, atol=1e-4)
        assert not torch.equal(integer, dense)
        with rows_are("generated"):
            assert torch.equal(layer(x), integer)
        with rows_are("short-prompt"):  # a short prompt's rows: the integer kernel on every machine and type
            assert torch.equal(layer(x), integer)


@needs_kernel
def test_the_prompt_product_follows_the_layout_unless_set(monkeypatch) -> None:
    """dense_for_prompts is derived from the layer's layout (packed() into the interleaved one changes it) unless a
    caller set it (a head or an expert: the integer kernel), which packing keeps."""
    kind = next((k for k in ("Q4_1", "Q8_0") if has_x4(k)), None)
    if kind is None:
        pytest.skip("no interleaved Q4_1 or Q8_0 product in this build")
    monkeypatch.setattr(native, "native_bf16", lambda: False)
    k = width(kind)
    row = GGUFBlockLinear(torch.from_numpy(random_blocks(kind, native.group_rows(kind), k, 4)), kind, k, interleaved=False)
    assert row.dense_for_prompts and not row.packed().dense_for_prompts
    row.dense_for_prompts = True  # the caller's choice survives packing
    assert row.packed().interleaved and row.packed().dense_for_prompts


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_fusing_layers_releases_the_parts_source_once(kind: str) -> None:
    """GGUFBlockLinear.cat_out copies its parts (fused q/k/v, gate/up) and then releases each part's source (the
    loader drops those file pages from resident memory), in either layout."""
    k = width(kind)
    released = []
    parts = []
    for i, n in enumerate((8, 4)):
        part = GGUFBlockLinear(torch.from_numpy(random_blocks(kind, n, k, 10 + i)), kind, k)
        part.on_release = lambda i=i: released.append(i)
        parts.append(part)
    fused = GGUFBlockLinear.cat_out(parts)
    assert sorted(released) == [0, 1]
    assert torch.equal(fused.row_blocks(), torch.cat([p.row_blocks() for p in parts]))
