"""attnkit's kernels as PyTorch operators (attnkit.kernels.ops): torch.library's own checks of each operator (schema,
fake tensors, AOT dispatch), bad tensors refused before C reads them, and GGUF layers and models that torch.compile
traces in one graph with the eager bits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attnkit.kernels import library
from attnkit.quant.native import GGUFBlockEmbedding, GGUFBlockLinear, has_x4, random_blocks

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")

OPS = torch.ops.attnkit


def layer(kind: str, n: int = 64, k: int = 512, seed: int = 0) -> GGUFBlockLinear:
    return GGUFBlockLinear(random_blocks(kind, n, k, seed), kind, k)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "Q4_1"])
def test_torch_library_checks_each_operator(kind: str) -> None:
    lay = layer(kind)
    x = torch.randn(3, lay.in_features)
    checks = [(OPS.block_mm.default, (x, lay.blocks, lay.kernel_kind, lay.out_features, False, -1)),
              (OPS.block_mm.default, (x, lay.blocks, lay.kernel_kind, lay.out_features, False, 0)),
              (OPS.block_dequantize.default, (lay.blocks, lay.kernel_kind, torch.empty(64, lay.in_features))),
              (OPS.block_rows.default, (lay.blocks, lay.kernel_kind, 64, lay.in_features, torch.tensor([5, 0, 63])))]
    if lay.gemm_shape():
        checks.append((OPS.block_mm.default, (torch.randn(20, lay.in_features), lay.blocks, lay.kernel_kind, 64, True, -1)))
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
    # the operator is the layer's product
    assert torch.equal(OPS.block_mm(x, lay.blocks, lay.kernel_kind, 64, False, -1), lay.kernel_product(x))
    assert torch.equal(OPS.block_rows(lay.blocks, lay.kernel_kind, 64, lay.in_features, torch.tensor([7, 2])),
                       lay.dequantize()[[7, 2]])


def test_bad_tensors_are_refused_before_any_c_code_reads_them() -> None:
    lay = layer("Q4_K")
    x = torch.randn(2, 512)
    with pytest.raises(ValueError, match="contiguous CPU uint8 tensor of 18432 bytes"):
        OPS.block_mm(x, lay.blocks[:32], lay.kernel_kind, 64, False, -1)  # half the rows the shape says
    with pytest.raises(ValueError, match="not whole blocks of 256"):
        OPS.block_mm(torch.randn(2, 500), lay.blocks, lay.kernel_kind, 64, False, -1)
    with pytest.raises(ValueError, match="float32"):
        OPS.block_mm(x.double(), lay.blocks, lay.kernel_kind, 64, False, -1)
    with pytest.raises(ValueError, match="act 3"):
        OPS.block_mm(x, lay.blocks, lay.kernel_kind, 64, False, 3)
    with pytest.raises(ValueError, match="no block type"):
        OPS.block_mm(x, lay.blocks, 0x7F, 64, False, -1)
    with pytest.raises(ValueError, match="bytes"):
        OPS.block_dequantize(lay.blocks, lay.kernel_kind, torch.empty(65, 512))
    with pytest.raises(IndexError, match="vocabulary of 64"):
        OPS.block_rows(lay.blocks, lay.kernel_kind, 64, 512, torch.tensor([3, 64]))
    with pytest.raises(IndexError, match="vocabulary of 64"):
        GGUFBlockEmbedding(lay)(torch.tensor([[-1]]))


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_gguf_layers_compile_in_one_graph_with_the_eager_bits(kind: str, monkeypatch) -> None:
    """fullgraph=True: no graph break in a layer's product (the integer kernel for a few rows, the tiled dense product
    for more — here in two tiles), in its gated form, or in an embedding lookup."""
    from attnkit.quant import frozen_grad

    monkeypatch.setattr(frozen_grad, "TILE_ELEMS", 64 * 512)  # 64 rows a tile: the 128-row layer in two
    torch._dynamo.reset()
    lay = layer(kind, n=128)
    emb = GGUFBlockEmbedding(lay)
    with torch.no_grad():
        for rows in (3, 12):
            x = torch.randn(rows, lay.in_features)
            compiled = torch.compile(lambda t: lay(torch.relu(t)) * 2, fullgraph=True, backend="aot_eager")
            assert torch.equal(compiled(x), lay(torch.relu(x)) * 2)
        if has_x4(kind):
            x = torch.randn(3, lay.in_features)
            gated = torch.compile(lambda t: lay.gated_product(t, "silu"), fullgraph=True, backend="aot_eager")
            assert torch.equal(gated(x), lay.gated_product(x, "silu"))
        ids = torch.tensor([[5, 0, 127]])
        assert torch.equal(torch.compile(emb, fullgraph=True, backend="aot_eager")(ids), emb(ids))


def test_a_gguf_model_compiles_in_one_graph_with_the_eager_logits(tmp_path: Path) -> None:
    """fullgraph=True over a whole Llama-family GGUF model (its GGUF products, quantized embedding and C RMSNorm all
    operators), on the integer kernel's rows and the dense ones, under no_grad and inference_mode."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loading_gguf import tiny_hf, write_gguf

    from attnkit.loading.gguf import load_gguf_model

    torch._dynamo.reset()
    model = load_gguf_model(write_gguf(tmp_path / "m.gguf", tiny_hf("llama"), "Q4_K", arch="llama"), quantize="gguf")
    assert any(isinstance(m, GGUFBlockLinear) for m in model.modules())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for n in (5, 12):
                ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g)
                assert torch.equal(compiled(ids), model(ids))


def test_rms_norm_operator_checks_and_matches_the_layer() -> None:
    from attnkit.kernels import train_kernels
    from attnkit.nn.norm import RMSNorm

    if train_kernels() is None:
        pytest.skip("no 512-bit training kernels here")
    x, w = torch.randn(3, 5, 64), torch.randn(64)
    for dt in (torch.float32, torch.bfloat16):
        result = torch.library.opcheck(OPS.rms_norm.default, (x, w, 1e-5, dt))
        assert all(v == "SUCCESS" for v in result.values()), result
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        y, r = OPS.rms_norm(x, w, 1e-5, torch.float32)
        assert torch.equal(y, norm(x)) and r.shape == (3, 5, 1)
        assert torch.allclose(r, torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5))
    with pytest.raises(ValueError, match=r"weight \(64,\) float32"):
        OPS.rms_norm(x, torch.randn(63), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        OPS.rms_norm(x, w, 1e-5, torch.float16)


def test_the_operators_do_not_import_torch_dynamo() -> None:
    """Calling them (and loading the GGUF layers and norms that use them) leaves torch._dynamo unimported: importing
    it costs ~145 MB of resident memory in a process that never compiles (issue 14's peak-RSS goal)."""
    import subprocess

    code = ("import sys, torch\n"
            "from attnkit.nn.norm import RMSNorm\n"
            "from attnkit.quant.native import GGUFBlockEmbedding, GGUFBlockLinear, random_blocks\n"
            "lay = GGUFBlockLinear(random_blocks('Q4_K', 64, 256, 0), 'Q4_K', 256)\n"
            "with torch.inference_mode():\n"
            "    lay(torch.randn(3, 256)); lay(torch.randn(12, 256)); GGUFBlockEmbedding(lay)(torch.tensor([1]))\n"
            "    RMSNorm(256)(torch.randn(2, 256)); lay.dequantize()\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
