"""The fine-tuning loss from hidden states, a chunk of labelled rows at a time (attnkit.train.chunked_loss), equals
the loss of the whole logits tensor — value and gradients — with LoRA and with prompt tuning in front (a frozen
head: the gradient made in the forward) and for full fine-tuning (the head trains: its chunks recomputed)."""

from __future__ import annotations

import pytest
import torch

from attnkit.models.llama import Llama, LlamaConfig
from attnkit.peft import LoraConfig, PromptTuningConfig, get_peft_model
from attnkit.train import chunked_loss
from attnkit.train.finetune import lm_loss, model_loss
from attnkit.train.sft_data import IGNORE
from finetune_helpers import lora_llama


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 20), generator=g)
    y = x.clone()
    y[0, :7] = IGNORE  # a prompt
    y[2, 15:] = IGNORE  # padding
    return x, y


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules="all-linear"), PromptTuningConfig(num_virtual_tokens=3),
                                    None])
def test_chunked_loss_equals_the_whole_logits_loss(monkeypatch, config) -> None:
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMS", 7 * 96)  # chunks of 7 rows: several, the last partial
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = Llama(cfg) if config is None else get_peft_model(Llama(cfg), config)
    assert chunked_loss.head_is_frozen(model) == (config is not None)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    x, y = _batch(96)
    whole = lm_loss(model(x), y)
    whole.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    chunked = model_loss(model, x, y)
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # an evaluation's chunks: the loss alone (kernels/cross_entropy.c where built)
        torch.testing.assert_close(model_loss(model, x, y, reduction="sum"), lm_loss(model(x), y, reduction="sum"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model_loss(model, x, y, reduction="sum"), lm_loss(model(x), y, reduction="sum"),
                                       rtol=1e-5, atol=1e-4)


def test_a_batch_without_labels_has_zero_loss_and_a_graph() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32))
    x = torch.randint(0, 64, (2, 8))
    loss = model_loss(model, x, torch.full_like(x, IGNORE))
    assert float(loss) == 0.0
    loss.backward()



@pytest.mark.parametrize("c_loss", [True, False])
@pytest.mark.parametrize("vocab", [96, 101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_frozen_heads_gradient_equals_autograds_cross_entropy(monkeypatch, dtype, vocab, c_loss) -> None:
    """The frozen-head loss makes ∂L/∂h by hand (softmax − onehot in float32, cast to the logits' dtype; by the C
    kernel's two passes, or PyTorch's ops): the loss and gradient equal autograd's cross-entropy over the same
    chunks' logits (under bf16 autocast: the same bf16 logits), a vocabulary a multiple of 16 or not."""
    monkeypatch.setattr(chunked_loss, "C_LOSS", c_loss)
    if c_loss and chunked_loss._loss_kernels(torch.empty(1, 1)) is None:
        pytest.skip("no C kernels here")
    torch.manual_seed(0)
    w, norm = torch.randn(vocab, 32) * 0.3, torch.nn.RMSNorm(32)
    head = lambda h: torch.nn.functional.linear(norm(h), w)  # noqa: E731
    h, y = torch.randn(20, 32, requires_grad=True), torch.randint(0, vocab, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        total = chunked_loss._LossWithGrad.apply(h, y, head, 7)
        ref, grads = 0.0, []
        for i in range(0, 20, 7):
            hc = h[i:i + 7].detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(head(hc).float(), y[i:i + 7], reduction="sum")
            grads.append(torch.autograd.grad(loss, hc)[0])
            ref += float(loss)
    total.backward()
    torch.testing.assert_close(float(total), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, torch.cat(grads), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_cross_entropy_against_torch_with_masked_logits_and_bad_labels(dtype) -> None:
    """kernels/cross_entropy.c alone: per-row loss and softmax − onehot against torch (logits of −∞ included, a
    vocabulary of 37 — vector columns and a tail), the gradient written over the logits; a label outside the
    vocabulary is refused (1), never read past the row."""
    from attnkit.kernels import library

    lib = library()
    if lib is None:
        pytest.skip("no C kernels here")
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(5, 37, generator=g) * 4).to(dtype)
    z[1, 3:30] = float("-inf")
    y = torch.tensor([0, 2, 36, 17, 5])
    want = torch.nn.functional.cross_entropy(z.float(), y, reduction="none")
    want_grad = (torch.softmax(z.float(), -1) - torch.nn.functional.one_hot(y, 37)).to(dtype)
    loss, zc = torch.empty(5), z.clone()
    assert lib.ak_cross_entropy(zc.data_ptr(), y.data_ptr(), 5, 37, int(dtype == torch.bfloat16), loss.data_ptr(),
                                zc.data_ptr(), 1) == 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zc.float(), want_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert lib.ak_cross_entropy(z.data_ptr(), torch.tensor([0, 1, 37, 0, 0]).data_ptr(), 5, 37,
                                int(dtype == torch.bfloat16), loss.data_ptr(), zc.data_ptr(), 1) == 1


def test_a_frozen_head_is_cast_once_under_autocast_with_the_same_loss_and_gradients(monkeypatch) -> None:
    """Under bf16 autocast the frozen float head is cast once (hidden_head: kept while the weight is unchanged) and
    its loss takes the two products apart into reused buffers; loss and adapter gradients equal those of the model's
    own logits (autocast casting the head in each chunk), bit for bit."""
    import attnkit.train.finetune as finetune_module

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMS", 7 * 96)
    model = lora_llama()
    x, y = _batch(96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head, _ = chunked_loss.hidden_head(model)
        assert isinstance(head, chunked_loss.FrozenHead) and head.weight.dtype == torch.bfloat16
        assert chunked_loss.hidden_head(model)[0].weight is head.weight  # the same cast, not a new one
        w = model.base_model.head_weight()
        with torch.no_grad():
            w.mul_(1.0)  # changed (its version): cast again
        assert chunked_loss.hidden_head(model)[0].weight is not head.weight
    assert chunked_loss.hidden_head(model)[0].weight is w  # no autocast: the head as it is

    def run() -> tuple[torch.Tensor, dict]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model_loss(model, x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    once, grads = run()
    monkeypatch.setattr(finetune_module, "hidden_head", lambda m: (m.base_model.logits, 96))  # cast in every chunk
    each, ref = run()
    assert torch.equal(once, each)
    for n, g in grads.items():
        assert torch.equal(g, ref[n]), n
