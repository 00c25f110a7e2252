"""attnkit's own GGUF block kernels (attnkit/kernels/; every type: tests/test_quant_types.py): decoding equals gguf's reference
bit for bit; products equal the dense product up to the 8-bit activation rounding; the default model
loaded with quantize="gguf" holds its perplexity within 1% of float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from attnkit.quant.native import GGUFBlockLinear, dequantize_reference, has_x4, library

needs_kernel = pytest.mark.skipif(library() is None, reason="no C compiler: the kernel could not be built")


def _layer(kind: str, n: int, k: int, seed: int = 0, interleaved: bool | None = None
           ) -> tuple[GGUFBlockLinear, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    blocks = quantize(w, getattr(T, kind))
    dense = torch.from_numpy(dequantize(blocks, getattr(T, kind)).reshape(n, k).astype(np.float32))
    return GGUFBlockLinear(torch.from_numpy(blocks.copy()), kind, k, interleaved=interleaved), dense


needs_x4 = pytest.mark.skipif(library() is None or not library().ak_x4_available(),
                              reason="the interleaved kernels need AVX2 or AVX-512 VNNI")


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_decoding_matches_gguf_reference(kind: str) -> None:
    layer, dense = _layer(kind, 48, 96)
    assert torch.equal(dequantize_reference(layer.row_blocks(), kind, 96), dense)
    if library() is not None:
        assert torch.equal(layer.dequantize(), dense)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_interleaving_is_a_permutation_within_groups_of_rows(kind: str) -> None:
    from attnkit.quant.native import deinterleave, group_rows, interleave

    R = group_rows(kind)  # 4, or 16 (Q8_0 with AVX-512 VNNI)
    layer, dense = _layer(kind, 3 * R, 96, interleaved=False)
    packed = interleave(layer.blocks, kind)
    assert packed.shape == layer.blocks.shape and not torch.equal(packed, layer.blocks)
    for g in range(3):  # each group of rows keeps its own bytes
        rows = slice(R * g, R * g + R)
        assert torch.equal(packed[rows].flatten().sort().values, layer.blocks[rows].flatten().sort().values)
    assert torch.equal(deinterleave(packed, kind), layer.blocks)
    if library() is not None and not has_x4(kind):  # an AVX2 build: no interleaved product, said so clearly
        with pytest.raises(ValueError, match="no product on interleaved"):
            GGUFBlockLinear(layer.blocks, kind, 96, interleaved=True)
        assert not GGUFBlockLinear(layer.blocks, kind, 96).interleaved  # the default keeps the row layout
        with pytest.raises(ValueError, match=f"multiple of {R} rows"):
            GGUFBlockLinear(layer.blocks[:10], kind, 96, interleaved=True)
        return
    x4 = GGUFBlockLinear(layer.blocks, kind, 96, interleaved=True)
    assert torch.equal(x4.row_blocks(), layer.blocks)
    idx = torch.tensor([11, 0, 5, 5, 2])
    assert torch.equal(x4.row_blocks(idx), layer.blocks[idx])
    assert torch.equal(dequantize_reference(x4.row_blocks(), kind, 96), dense)
    if library() is not None:
        assert torch.equal(x4.dequantize(), dense)
        assert torch.equal(x4.dequantize(torch.bfloat16), dense.bfloat16())
    with pytest.raises(ValueError, match=f"multiple of {R} rows"):
        GGUFBlockLinear(layer.blocks[:10], kind, 96, interleaved=True)


@needs_x4
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_interleaved_product_equals_the_row_layout_one(kind: str, rows: int) -> None:
    """The same integer block sums and scales, added in another order: equal up to float32 rounding."""
    plain, dense = _layer(kind, 208, 576, seed=rows, interleaved=False)  # 13 groups of 16 rows, 52 of 4
    x4 = GGUFBlockLinear(plain.blocks, kind, 576, interleaved=True)
    assert x4.interleaved and x4.kernel_kind == plain.kernel_kind | 0x100
    x = torch.randn(rows, 576)
    torch.testing.assert_close(x4(x), plain(x), rtol=1e-5, atol=1e-5)
    ref = x @ dense.T
    assert ((x4(x) - ref).norm() / ref.norm()).item() < 0.02


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out", [200, 202])  # 200: four weight rows at a time (interleaved where it can); 202: one
def test_kernel_product_matches_dense(kind: str, rows: int, out: int) -> None:
    layer, dense = _layer(kind, out, 576, seed=rows)
    assert not layer.interleaved or out % 4 == 0
    x = torch.randn(1, rows, 576)
    ref = x @ dense.T
    y = layer(x)
    assert y.shape == (1, rows, out)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel  # activations are rounded to 8 bits per block of 32, as in llama.cpp
    assert rel > 0  # the integer path really ran (the dense path would be exact)


@needs_kernel
def test_many_rows_use_the_dense_product_exactly() -> None:
    layer, dense = _layer("Q4_1", 64, 128)
    x = torch.randn(GGUFBlockLinear.kernel_max_rows + 5, 128)
    torch.testing.assert_close(layer(x), x @ dense.T)
    xb = x.bfloat16()
    assert layer(xb).dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_bf16_decoding_rounds_as_torch(kind: str) -> None:
    layer, dense = _layer(kind, 72, 160, seed=3)  # 72 rows: the threaded loop; 160 inputs: 5 blocks
    assert torch.equal(layer.dequantize(torch.bfloat16), dense.bfloat16())  # round-to-nearest-even, bit for bit
    buf = torch.empty(72, 160, dtype=torch.bfloat16)
    assert layer.dequantize(torch.bfloat16, out=buf).data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="bfloat16.*72, 160"):
        layer.dequantize(torch.bfloat16, out=torch.empty(72, 160))  # a float32 buffer for bf16 output


@needs_kernel
def test_bf16_dense_product_is_the_product_of_the_rounded_inputs() -> None:
    from attnkit.quant.native import set_dense_dtype

    layer, dense = _layer("Q8_0", 64, 128, seed=4)
    x = torch.randn(GGUFBlockLinear.kernel_max_rows + 5, 128)
    assert set_dense_dtype(layer, torch.bfloat16) == 1
    y = layer(x)
    assert y.dtype == torch.float32
    exact, rounded = x @ dense.T, x.bfloat16().float() @ dense.bfloat16().float().T
    torch.testing.assert_close(y, rounded, rtol=8e-3, atol=1e-3)  # bf16 inputs, float32 sums, a bf16 result
    assert (y - exact).abs().max() > 1e-4  # it really ran in bf16
    small = x[:3]
    torch.testing.assert_close(layer(small), GGUFBlockLinear.forward(layer, small))  # the kernel rows are unchanged
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        set_dense_dtype(layer, torch.float16)


def test_cat_out_and_bias() -> None:
    a, da = _layer("Q4_1", 32, 64, 1)
    b, db = _layer("Q4_1", 16, 64, 2)
    b.bias = torch.arange(16.0)
    fused = GGUFBlockLinear.cat_out([a, b])
    x = torch.randn(20, 64)  # dense path: exact
    ref = torch.cat([x @ da.T, x @ db.T + torch.arange(16.0)], dim=-1)
    torch.testing.assert_close(fused(x), ref)
    plain = GGUFBlockLinear.cat_out([GGUFBlockLinear(m.row_blocks(), "Q4_1", 64, m.bias, interleaved=False) for m in (a, b)])
    assert torch.equal(fused.row_blocks(), plain.row_blocks())  # in GGUF's layout, the rows of a then b
    with pytest.raises(ValueError, match="share their input size"):
        GGUFBlockLinear.cat_out([a, _layer("Q4_1", 16, 96)[0]])


@needs_kernel
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("interleaved", [None, False])
def test_the_gated_product_applies_act_to_the_forwards_products(kind: str, interleaved: bool | None) -> None:
    """A fused gate/up's gated_product (the kernels' epilogue: the (rows, 2·ff) product never made) is act(gate)·up
    of the forward's own products, SiLU and GELU-tanh, on the prompt rows' product and the decode kernel; a row's
    bits are the same alone and among 130 rows (gemm.c's panels from 64 rows, the decode kernel below). None where
    the forward would take a dense product."""
    from attnkit.quant.native import random_blocks
    from attnkit.quant.row_kernel import rows_are

    k, ff = 256, 48
    gu = GGUFBlockLinear.cat_out([GGUFBlockLinear(random_blocks(kind, ff, k, seed=s), kind, k, interleaved=interleaved)
                                  for s in (1, 2)])
    x = torch.randn(130, k)
    for rows in ("prompt", "short-prompt", "generated"):
        with torch.inference_mode(), rows_are(rows):
            full = gu(x)
            g, u = full[:, :ff].double(), full[:, ff:].double()
            for act, ref in (("silu", torch.nn.functional.silu(g) * u),
                             ("gelu_tanh", torch.nn.functional.gelu(g, approximate="tanh") * u)):
                h = gu.gated_product(x, act)
                if gu._path(x) == "dense":  # (no integer product for a prompt's rows in this build)
                    assert h is None
                    continue
                torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
                alone = torch.cat([gu.gated_product(x[i:i + 1], act) for i in range(0, 130, 13)])
                assert torch.equal(alone, h[::13]) and torch.equal(gu.gated_product(x[:70], act), h[:70])
    assert gu.gated_product(x, "relu") is None  # not an activation the epilogue has
    gu.int8_prompts, gu.dense_for_prompts = False, True
    with torch.inference_mode(), rows_are("prompt"):
        assert gu.gated_product(x, "silu") is None  # the forward's dense product: act is the caller's


def test_bad_inputs_are_named() -> None:
    layer, _ = _layer("Q4_1", 8, 64)
    with pytest.raises(ValueError, match="no kernel"):
        GGUFBlockLinear(layer.blocks, "Q2_K", 64)
    with pytest.raises(ValueError, match="multiple of the block size"):
        GGUFBlockLinear(layer.blocks, "Q4_1", 60)
    with pytest.raises(ValueError, match=r"shape \(out, 40\)"):
        GGUFBlockLinear(layer.blocks[:, :20], "Q4_1", 64)
    with pytest.raises(ValueError, match="expected 64"):
        layer(torch.randn(1, 65))


@needs_kernel
def test_default_model_in_gguf_blocks_holds_perplexity() -> None:
    from engine_helpers import skip_module_without_default_model

    skip_module_without_default_model()
    from attnkit.eval import greedy_agreement, perplexity, shipped_text
    from attnkit.loading import load_causal_lm

    from attnkit.quant.native import GGUFBlockEmbedding

    ref = load_causal_lm(None)
    lm = load_causal_lm(None, quantize="gguf")
    kinds = {m.kind for m in lm.model.modules() if isinstance(m, GGUFBlockLinear)}
    assert kinds == {"Q4_1", "Q8_0"} and isinstance(lm.model.output_head, GGUFBlockLinear)  # layers and the tied head
    emb = lm.model.tok_embeddings  # the tied table: rows decoded from the head's Q8_0 blocks, no float copy
    assert isinstance(emb, GGUFBlockEmbedding) and emb.head[0] is lm.model.output_head
    ids = torch.tensor([[0, 1, 500, 49151], [7, 7, 7, 7]])
    assert torch.equal(emb(ids), ref.model.tok_embeddings(ids))
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([49152]))
    ids = ref.tokenizer.encode(shipped_text())[:256]
    base = perplexity(ref.model, ids, window=256).ppl
    ppl = perplexity(lm.model, ids, window=256).ppl  # one 256-token window: the dense path, exact weights
    assert abs(ppl / base - 1) < 0.01, (ppl, base)
    ag = greedy_agreement(ref.model, lm.model, ref.tokenizer.encode("We hold these truths to be self-evident"), 32)
    assert ag.rate >= 0.8, ag  # greedy decoding runs one row at a time: the integer kernel


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q8_0")])
def test_gguf_files_load_into_blocks_and_match_the_dequantized_model(tmp_path, arch: str, qtype: str) -> None:
    """Tiny GGUF files (llama with its Q/K row permutation; qwen2 with q/k/v bias): quantize="gguf" keeps the
    blocks of the file's own type and gives the dequantized model's logits."""
    pytest.importorskip("transformers")
    from test_loading_gguf import IDS, tiny_hf, write_gguf

    from attnkit.loading.gguf import load_gguf_model

    path = write_gguf(tmp_path / f"{arch}-{qtype}.gguf", tiny_hf(arch), qtype, arch=arch)
    floaty = load_gguf_model(path)
    blocks = load_gguf_model(path, quantize="gguf")
    layers = [m for m in blocks.modules() if isinstance(m, GGUFBlockLinear)]
    if library() is None:
        assert not layers
        return
    assert layers and {m.kind for m in layers} == {qtype}
    for name, m in blocks.named_modules():
        if isinstance(m, GGUFBlockLinear):  # decoded weights: exactly the dequantized ones
            if name == "output_head":
                want = floaty.tok_embeddings.weight if floaty.lm_head is None else floaty.lm_head.weight
            else:
                want = floaty.get_submodule(name).weight
            torch.testing.assert_close(m.dequantize(), want, rtol=0, atol=0)
    with torch.no_grad():
        long = torch.cat([IDS] * 3, dim=1)[:, :24]  # > kernel_max_rows per row: the dense path, exact weights
        torch.testing.assert_close(blocks(long), floaty(long), rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_kernels_step_aside(tmp_path, monkeypatch) -> None:
    """No C compiler: library() warns and returns None (callers fall back to PyTorch), no .so is left behind."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert library.__wrapped__() is None
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_gguf_path_decodes_like_llama_cpp(monkeypatch) -> None:
    """Reference parity: quantize="gguf" multiplies the file's blocks the way llama.cpp does, so greedy
    decoding gives llama.cpp's tokens, for at least 8 tokens unless the two part at one of llama.cpp's own
    near-ties (summation order differs with the instruction set: on one AVX-512 machine both answers part at
    token 7, where llama.cpp's two candidates are 0.1 nats apart). Skipped unless llama-cpp-python is
    installed: it is optional."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from engine_helpers import skip_module_without_default_model

    skip_module_without_default_model()
    from attnkit import LLM, SamplingParams
    from attnkit.loading.defaults import default_chat_model

    # the prompt's rows through the integer kernel too, as llama.cpp's prefill takes them (8-bit activations);
    # attnkit's default sends prompts of more than 8 rows to a dense product. Where a dense product runs, in
    # float32: bf16 (matmul_dtype "auto" on bf16 hardware) rounds activations once more than llama.cpp does,
    # enough to flip this first token, a near-tie (logits 25.36 vs 25.31)
    monkeypatch.setattr(GGUFBlockLinear, "kernel_max_rows", 64)
    llm = LLM(matmul_dtype="float32")
    ref = llama_cpp.Llama(model_path=str(default_chat_model()), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    convs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.")]
    for conv in convs:
        ids = llm.render_chat(conv)
        theirs = []
        for t in ref.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(t)
            if len(theirs) == 12:
                break
        ours = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 12)
        said = (llm.tokenizer.decode(ours), llm.tokenizer.decode(theirs))
        assert same >= 4, said
        if same < 8:  # the paths may part only where llama.cpp itself nearly ties between the two tokens
            ref.reset()
            ref.eval(ids + theirs[:same])
            logp = torch.log_softmax(torch.tensor(ref.scores[ref.n_tokens - 1], dtype=torch.float32), -1)
            top2 = set(logp.topk(2).indices.tolist())  # llama.cpp's own prefill of the same text may pick either
            assert {theirs[same], ours[same]} == top2 and abs(float(logp[theirs[same]] - logp[ours[same]])) < 0.3, said


@needs_kernel
def test_a_float_model_to_blocks_runs_on_the_kernels() -> None:
    """quant.native.to_blocks: every linear layer becomes Q8_0 blocks, the head an output_head of them (the float
    lm_head is left, unused); logits stay close."""
    from attnkit.models.llama import Llama, LlamaConfig
    from attnkit.quant.native import to_blocks

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)).eval()
    ids = torch.randint(0, 320, (1, 12))
    with torch.inference_mode():
        ref = model(ids)
        n = to_blocks(model, "Q8_0")
        got = model(ids)
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert n == 2 * 7 + 1 and linears == ["lm_head"] and isinstance(model.output_head, GGUFBlockLinear)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel
