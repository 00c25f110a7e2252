"""Gradient checkpointing (Chen et al. 2016): each decoder block recomputed in the backward gives the losses
and gradients of the plain backward, for the Llama stack (every family built on it) and GPT-2, full
fine-tuning and PEFT (LoRA with dropout: the RNG is replayed; prefix tuning: its cache is copied per call)."""

from __future__ import annotations

import pytest
import torch

from attnkit.data.sft_tasks import write_jsonl
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.peft import METHODS, get_peft_model
from attnkit.train.finetune import FinetuneArgs, finetune, lm_loss

from finetune_helpers import chat_rows, tiny_lm


def _grads(model: torch.nn.Module, recompute: bool, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    base = getattr(model, "base_model", model)
    base.gradient_checkpointing = recompute
    calls = []
    hook = base.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    x = torch.randint(1, 60, (3, 17))
    loss = lm_loss(model(x), x)
    loss.backward()
    hook.remove()
    assert len(calls) == (2 if recompute else 1)  # the block ran again in the backward
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora", "prefix"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(kind):
    if kind == "gpt2":
        torch.manual_seed(0)
        model: torch.nn.Module = GPT2(GPT2Config(vocab_size=64, max_seq_len=32, d_model=32, n_layers=3, n_heads=4, d_ff=64))
    else:
        model = tiny_lm().model
    if kind == "lora":
        model = get_peft_model(model, METHODS["lora"](r=4, lora_alpha=8, lora_dropout=0.3))
    elif kind == "prefix":
        model = get_peft_model(model, METHODS["prefix"](num_virtual_tokens=3, prefix_projection=False))
    loss0, g0 = _grads(model, False)
    loss1, g1 = _grads(model, True)
    assert g0 and g0.keys() == g1.keys()
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)


def test_no_recompute_outside_training():
    model = tiny_lm().model
    model.gradient_checkpointing = True
    x = torch.randint(1, 60, (1, 9))
    with torch.no_grad():
        a = model.eval()(x)
    torch.testing.assert_close(a, model.train()(x).detach())


def test_finetune_with_gradient_checkpointing(tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", chat_rows(8)))
    kw = dict(method="lora", data=data, eval_data=data, steps=3, batch_size=4, lr=1e-2, warmup=1, eval_every=0)
    plain = finetune(FinetuneArgs(**kw), tmp_path / "a", lm=tiny_lm(), progress=False)["model"]
    ckpt = finetune(FinetuneArgs(gradient_checkpointing=True, **kw), tmp_path / "b", lm=tiny_lm(), progress=False)
    assert ckpt["model"].base_model.gradient_checkpointing
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt["model"].named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
