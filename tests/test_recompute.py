"""Selective recomputation (attnkit.nn.recompute): a LoRA model's gradients are bitwise those of plain autograd,
and the declared activations are saved as recipes, not tensors."""

from __future__ import annotations

import pytest
import torch

from attnkit.models.llama import Llama, LlamaConfig
from attnkit.nn import recompute
from attnkit.nn.ffn import silu_mul
from attnkit.peft import LoraConfig, get_peft_model
from attnkit.train.finetune import model_loss
from finetune_helpers import lora_llama


def test_a_declared_activation_and_its_views_are_saved_as_recipes():
    g = torch.randn(2, 3, 8, requires_grad=True)
    u = torch.randn(2, 3, 8, requires_grad=True)
    with recompute.recompute_saved():
        h = silu_mul(g, u)
        view = h.view(6, 8)[2:]
        packed = recompute._pack(view)
        other = recompute._pack(g * 2)
    assert not isinstance(packed, torch.Tensor) and isinstance(other, torch.Tensor)
    assert torch.equal(recompute._unpack(packed), view)
    assert isinstance(recompute._pack(silu_mul(g, u)), torch.Tensor)  # outside the context nothing is declared


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_gradients_are_unchanged_by_recomputation(bf16):
    """Under bf16 autocast too: there the frozen weights' casts and the norms' outputs (cast once, in the norm)
    are recipes as well, so the step keeps no bf16 copy of a weight nor of a norm's output."""
    model = lora_llama()
    d_model = model.base_model.cfg.d_model
    x = torch.randint(0, 96, (3, 20))
    docs = torch.tensor([[0] * 12 + [1] * 8, [0] * 20, [0] * 15 + [-1] * 5])  # packed rows, one padded
    grads, kept = [], []
    pack = recompute._pack

    def counting(t):
        packed = pack(t)
        if isinstance(packed, torch.Tensor):
            kept.append(packed)
        return packed

    for context in (torch.enable_grad, recompute.recompute_saved):
        model.zero_grad()
        kept.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recompute, "_pack", counting)  # before the context takes it as its hook
            with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model_loss(model, x, x, doc_ids=docs)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    if bf16:
        frozen = {tuple(p.shape) for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
        assert not [t for t in kept if t.dtype == torch.bfloat16 and tuple(t.shape) in frozen]  # weight casts
        normed = [t for t in kept if t.dtype == torch.bfloat16 and t.dim() == 2 and t.shape == (x.numel(), d_model)]
        # a norm's output, which each product cast and kept a copy of (2 layers × (q, k, v; gate, up) × (W₀, A)):
        # now only the first norm's, kept once — its input, the embedding, needs no gradient, so autograd keeps no
        # 1/rms to remake it from
        assert len(normed) == 3


def test_a_recipe_keeps_nothing_alive():
    import weakref

    with recompute.recompute_saved():
        g = torch.randn(4, 8, requires_grad=True) * 1.0  # not a leaf: only the graph of h holds it
        u = torch.randn(4, 8)
        h = silu_mul(g, u)
        gone = weakref.ref(g)
        del g, h
        assert gone() is None  # the forward under gradient checkpointing frees what no backward needs


def test_the_layers_keep_one_additive_mask_between_them():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = get_peft_model(Llama(cfg), LoraConfig(r=4, target_modules="all-linear"))
    x = torch.randint(0, 96, (2, 16))
    docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    loss = model_loss(model, x, x, doc_ids=docs)
    masks, stack, seen, layers = set(), [loss.grad_fn], set(), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "_saved_attn_mask") and node._saved_attn_mask is not None:  # torch's SDPA
            masks.add(node._saved_attn_mask.untyped_storage().data_ptr())
        if type(node).__name__ == "_BmmAttentionBackward":  # attnkit.nn.bmm_attention (training on the CPU)
            masks.add(node.saved_tensors[4].untyped_storage().data_ptr())
            layers += 1
        stack.extend(n for n, _ in node.next_functions)
    assert layers == 3 and len(masks) == 1  # SDPA given a bool mask would convert and keep one per layer (3 here)
