"""QLoRA (issue 19, item 1): adapters trained over a base that stays quantized. The backward pass through a
frozen quantized product (attnkit.quant.frozen_grad) equals autograd through the dequantized weight, tile
boundaries included; LoRA over a GGUF-block or int4 model gets the gradients it gets over the same weights in
float, and the base never changes nor holds a float copy of itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.quant import frozen_grad
from attnkit.quant.native import GGUFBlockLinear, dequantize_reference, has_x4, library, random_blocks

needs_kernel = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 rows: the layers below take several, the last one partial."""
    monkeypatch.setattr(frozen_grad, "TILE_ELEMS", 64 * 256)


def _check_grads(layer: nn.Module, dense: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, k, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    ref = F.linear(ref_x, dense, bias)
    tol = 1e-5 * float(ref.detach().abs().max())  # float32 sums in another order
    torch.testing.assert_close(y, ref, rtol=0, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-5 * float(ref_x.grad.abs().max()))


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_backward_through_gguf_blocks_equals_the_dequantized_product(small_tiles, kind: str) -> None:
    n, k = 200, 256  # 200 rows: tiles of 64 + a partial one
    blocks = random_blocks(kind, n, k, seed=1)
    bias = torch.randn(n)
    layer = GGUFBlockLinear(blocks, kind, k, bias=bias, interleaved=False)
    _check_grads(layer, dequantize_reference(blocks, kind, k), bias, k)
    assert not any(p.requires_grad for p in layer.parameters()) and layer.blocks.grad is None


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_backward_through_interleaved_blocks(small_tiles, kind: str) -> None:
    if library() is None or not has_x4(kind):
        pytest.skip(f"no interleaved {kind} product in this build (AVX-512 VNNI: every type; AVX2: all but Q6_K)")
    n, k = 144, 256  # nine groups of 16 rows (Q4_K on AVX-512 VNNI), more of 4
    blocks = random_blocks(kind, n, k, seed=2)
    layer = GGUFBlockLinear(blocks, kind, k, interleaved=True)
    _check_grads(layer, dequantize_reference(blocks, kind, k), None, k)


def test_backward_through_nf4_int4_and_int8(small_tiles) -> None:
    from attnkit.quant.quantize import quantize_weight

    torch.manual_seed(1)
    w, b = torch.randn(200, 128) * 0.05, torch.randn(200)
    for scheme in ("nf4", "int4", "int8"):
        layer = quantize_weight(w, scheme, b).float()
        _check_grads(layer, layer.dequantize(torch.float32), b, 128)


def test_nf4_codes_and_scales_equal_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    from attnkit.quant.nf4 import NF4Linear

    torch.manual_seed(2)
    w = torch.randn(12, 256) * 0.02
    w[3, :64] = 0  # an all-zero block
    ours = NF4Linear.from_float(w)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.packed, packed.view(12, 128))
    torch.testing.assert_close(ours.absmax, state.absmax.view(12, 4), rtol=0, atol=0)
    torch.testing.assert_close(ours.dequantize(), bnb.dequantize_4bit(packed, state), rtol=0, atol=0)


def test_nf4_refuses_rows_that_blocks_of_64_do_not_divide() -> None:
    from attnkit.quant.nf4 import NF4Linear
    from attnkit.quant.quantize import check_quantizable

    with pytest.raises(ValueError, match="divisible by 64"):
        NF4Linear.from_float(torch.randn(4, 96))
    with pytest.raises(ValueError, match="layers.0.q_proj: NF4 weights need in_features divisible by 64"):
        check_quantizable("layers.0.q_proj", 96, "nf4", 32)


def test_tiles_cut_interleaved_blocks_at_groups_of_four() -> None:
    layer = GGUFBlockLinear(random_blocks("Q8_0", 8, 64), "Q8_0", 64, interleaved=False)
    with pytest.raises(ValueError, match=r"rows \[4, 9\)"):
        layer.dequantize_rows(4, 9, torch.empty(5, 64))
    assert frozen_grad.tile_rows(layer) % 64 == 0


def _tiny(seed: int = 0):
    from attnkit.models.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=64)
    return Llama(cfg).eval()


def _lora_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from attnkit.peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)  # nonzero: the adapter's own path carries a gradient to A
    logits = peft(ids[:, :-1])
    logits = logits if isinstance(logits, torch.Tensor) else logits[0]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}


@needs_kernel
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_lora_over_gguf_blocks_trains_like_lora_over_the_same_weights_in_float(kind: str) -> None:
    from attnkit.peft.tuner import dense_weight
    from attnkit.quant.native import to_blocks

    quantized = _tiny()
    assert to_blocks(quantized, kind) > 0
    float_twin = _tiny()  # the same architecture, its linear weights set to the blocks' values
    twin = dict(float_twin.named_modules())
    with torch.no_grad():
        for name, q in quantized.named_modules():
            if isinstance(q, GGUFBlockLinear):
                target = twin["lm_head"] if name == "output_head" else twin[name]  # to_blocks' head: output_head
                target.weight.copy_(dense_weight(q))
    before = [(b, b.clone()) for n, b in quantized.named_buffers() if n.endswith("blocks")]
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))
    loss_q, grads_q = _lora_grads(quantized, ids)
    loss_f, grads_f = _lora_grads(float_twin, ids)
    assert set(grads_q) == set(grads_f) and any("lora_A" in n for n in grads_q)
    torch.testing.assert_close(loss_q, loss_f, rtol=1e-5, atol=1e-5)
    for n in grads_f:
        torch.testing.assert_close(grads_q[n], grads_f[n], rtol=1e-4, atol=1e-6, msg=n)
    assert before and all(torch.equal(b, copy) for b, copy in before)
    assert not any(p.requires_grad for n, p in quantized.named_parameters() if "lora_" not in n)


def test_a_merge_into_a_quantized_base_is_refused() -> None:
    from attnkit.peft import LoraConfig, get_peft_model
    from attnkit.quant.native import to_blocks

    model = _tiny()
    to_blocks(model, "Q8_0")
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized"):
        peft.merge_adapter()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_outside_the_engine_goes_by_tiles(monkeypatch, small_tiles, dtype) -> None:
    """Evaluation without gradients (a QLoRA run's, float32 or under bf16 autocast): the product is computed tile
    by tile in its dtype, never through a copy of the whole matrix (the engine's reused scratch)."""
    from attnkit.nn import scratch

    scratch.release("dense.")  # the engine's decoded-weight buffers, none held
    blocks = random_blocks("Q6_K", 300, 256, seed=3)
    layer = GGUFBlockLinear(blocks, "Q6_K", 256, interleaved=False)
    x = torch.randn(40, 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x.to(dtype))
    want = x @ dequantize_reference(blocks, "Q6_K", 256).T
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * float(want.abs().max())
    torch.testing.assert_close(y.float(), want, rtol=0, atol=tol)
    assert not scratch.held("dense.")


@needs_kernel
def test_a_float32_evaluation_outside_the_engine_takes_the_training_forwards_tiles(monkeypatch, small_tiles) -> None:
    """Any float32 product of many rows outside the engine (a QLoRA run's evaluation) goes tile by tile as the
    training forward does — the same numbers, and no layer-sized float buffer (it set a QLoRA run's peak)."""
    from attnkit.nn import scratch

    scratch.release("dense.")  # the engine's decoded-weight buffers, none held
    blocks = random_blocks("Q4_K", 192, 512, seed=5)
    layer = GGUFBlockLinear(blocks, "Q4_K", 512)
    x = torch.randn(GGUFBlockLinear.kernel_max_rows + 7, 512)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, frozen_grad.tiled_product(layer, x))
    assert torch.equal(y, frozen_grad.frozen_linear(layer, x.requires_grad_()).detach())
    assert not scratch.held("dense.")


def test_tiles_made_under_inference_mode_serve_training_after(small_tiles) -> None:
    """The reused tile buffer, first made by an inference pass (torch.inference_mode), is replaced for a training
    pass: an inference tensor cannot be written outside that mode (NF4 layers decode into it with copy_)."""
    from attnkit.quant.quantize import quantize_weight

    torch.manual_seed(3)
    layer = quantize_weight(torch.randn(200, 128) * 0.05, "nf4", None).float()
    x = torch.randn(3, 128)
    with torch.inference_mode():
        frozen_grad.tiled_product(layer, x)
    x.requires_grad_(True)
    y = layer(x)  # frozen_linear: the forward and the backward by tiles
    y.sum().backward()
    dense = layer.dequantize(torch.float32)
    torch.testing.assert_close(y.detach(), x.detach() @ dense.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, dense.sum(0).expand(3, 128), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("base", ["Q4_K", "Q6_K", "nf4"])
def test_under_bf16_autocast_the_frozen_products_run_on_bf16_tiles(small_tiles, base: str) -> None:
    """Under CPU bf16 autocast (a bf16 run) the tiles are bfloat16 — decoded so by the kernels for GGUF blocks,
    converted for the others — and the product is bf16 autocast's over the same weight in bf16: the output equals
    F.linear of the bf16-rounded dequantized weight under autocast and the input's gradient equals autograd's, to bf16
    rounding of the tiles' partial sums (summed in float32)."""
    from attnkit.quant.quantize import quantize_weight

    n, k = 200, 256
    if base == "nf4":
        torch.manual_seed(5)
        layer = quantize_weight(torch.randn(n, k) * 0.05, "nf4", None).float()
        dense = layer.dequantize(torch.float32)
    else:
        blocks = random_blocks(base, n, k, seed=4)
        layer = GGUFBlockLinear(blocks, base, k, interleaved=False)
        dense = dequantize_reference(blocks, base, k)
    torch.manual_seed(0)
    x = torch.randn(3, 5, k, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    seen = []
    real = frozen_grad._tile
    frozen_grad._tile = lambda n_, k_, dtype=torch.float32: seen.append(dtype) or real(n_, k_, dtype)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            ref = F.linear(ref_x, dense)
    finally:
        frozen_grad._tile = real
    assert set(seen) == {torch.bfloat16} and y.dtype == torch.bfloat16
    # the same bf16 weights and inputs through bf16 products (a tile's and the whole weight's may block differently)
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=1e-2 * float(ref.detach().abs().max()))
    g = torch.randn(y.shape).bfloat16()
    y.backward(g)
    ref.backward(g)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=2e-2 * float(ref_x.grad.abs().max()))
