"""The causal-LM trainer on a tiny model: response-only loss, packing, accumulation, schedules,
checkpoints that resume exactly, the JSONL errors, and ``attnkit finetune``."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli import main
from attnkit.data.sft_tasks import write_jsonl
from attnkit.peft import PeftModel
from attnkit.train.finetune import FinetuneArgs, finetune, lr_factor
from attnkit.train.sft_data import IGNORE, load_examples, micro_batches, pack, read_jsonl, tokenize

from finetune_helpers import chat_rows, tiny_lm, tiny_tokenizer


@pytest.fixture
def data(tmp_path):
    return str(write_jsonl(tmp_path / "train.jsonl", chat_rows(12)))


def test_chat_loss_only_on_assistant_tokens():
    tok = tiny_tokenizer()
    row = {"messages": [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "what colour is the sky ?"},
                        {"role": "assistant", "content": "blue"}, {"role": "user", "content": "the grass ?"},
                        {"role": "assistant", "content": "green"}]}
    ids, labels = tokenize(row, tok, 128)
    learned = [tok.decode([t], skip_special_tokens=False) for t in labels if t != IGNORE]
    assert learned == ["blue", "<|im_end|>", "green", "<|im_end|>"]
    assert [t for t, l in zip(ids, labels) if l != IGNORE] == [t for t in labels if t != IGNORE]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|> system w1 w2")


def test_plain_text_and_prompt_completion():
    tok = tiny_tokenizer()
    ids, labels = tokenize({"text": "the sky is blue"}, tok, 128)
    assert ids == labels and ids[-1] == tok.tk.token_to_id("<|im_end|>")  # EOS closes plain text
    ids, labels = tokenize({"prompt": "the sky is", "completion": "blue"}, tok, 128)
    assert [tok.decode([t]) for t in labels if t != IGNORE] == ["blue", ""]  # + EOS (a special token)
    assert labels[:3] == [IGNORE] * 3


def test_packing_and_batches():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    packed = pack(rows, 4)
    assert packed == [([1, 2, 3, 4], [1, 2, 3, IGNORE]), ([5, 6, 7, 8], [5, 6, 7, 8])]
    x, y = next(micro_batches(rows, 2, pad_id=0, seed=0))
    assert x.shape == y.shape and (y[x == 0] == IGNORE).all()


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the sky"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="expected an object with"):
        read_jsonl(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "sky ?"}]}\n')
    with pytest.raises(ValueError, match="no assistant message"):
        load_examples(bad, tiny_tokenizer(), 64)
    with pytest.raises(ValueError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_schedules():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "linear") == pytest.approx(0.0)
    assert lr_factor(80, 10, 100, "constant") == 1.0


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ptuning", "ia3", "full"])
def test_finetune_learns(tmp_path, data, method):
    lr = {"prompt": 0.3, "full": 1e-2, "ia3": 0.1}.get(method, 3e-2)
    args = FinetuneArgs(method=method, data=data, eval_data=data, steps=12, batch_size=4, lr=lr, warmup=2,
                        eval_every=6, num_virtual_tokens=4, encoder_hidden_size=16, bottleneck_size=8)
    r = finetune(args, tmp_path / "run", lm=tiny_lm(), progress=False)
    assert r["eval_after"]["eval_loss"] < r["eval_before"]["eval_loss"] - 0.1
    assert [e["step"] for e in json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["evals"]] == [0, 6, 12]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 12
    if method == "full":
        assert r["trainable_params"] == r["total_params"]
        return
    assert 0 < r["trainable_params"] < r["total_params"]
    loaded = PeftModel.from_pretrained(tiny_lm().model, tmp_path / "run" / "adapter")  # the saved adapter
    x = torch.tensor([[2, 4, 21, 17, 9, 19, 14, 18, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), r["model"](x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_resume_is_exact(tmp_path, data, method):
    kw = dict(method=method, data=data, eval_data=data, batch_size=3, lr=1e-2, warmup=2, eval_every=0,
              num_virtual_tokens=3, encoder_hidden_size=8, seed=1)
    straight = finetune(FinetuneArgs(steps=8, **kw), tmp_path / "a", lm=tiny_lm(), progress=False)["model"]
    assert finetune(FinetuneArgs(steps=8, **kw), tmp_path / "b", lm=tiny_lm(), progress=False, stop_after=4)["stopped"]
    resumed = finetune(FinetuneArgs(steps=8, **kw), tmp_path / "b", lm=tiny_lm(), progress=False, resume=True)["model"]
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_grad_accumulation_equals_a_bigger_batch(tmp_path):
    rows = [{"text": f"w{i} w{i + 1} w{i + 2} w{i + 3}"} for i in range(8)]  # equal lengths: equal token weights
    data = str(write_jsonl(tmp_path / "d.jsonl", rows))
    kw = dict(method="lora", data=data, eval_data=data, steps=1, lr=1e-2, warmup=1, eval_every=0, clip=0.0,
              bf16=False)  # float32: the two orders of summation agree to 1e-6
    one = finetune(FinetuneArgs(batch_size=4, **kw), tmp_path / "a", lm=tiny_lm(), progress=False)["model"]
    acc = finetune(FinetuneArgs(batch_size=2, grad_accum=2, **kw), tmp_path / "b", lm=tiny_lm(), progress=False)["model"]
    for (n, p), (_, q) in zip(one.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_packing_and_bf16_train(tmp_path, data):
    args = FinetuneArgs(method="lora", data=data, eval_data=data, steps=6, batch_size=2, lr=3e-2, warmup=1,
                        eval_every=0, packing=True, bf16=True, seq_len=32)
    r = finetune(args, tmp_path / "run", lm=tiny_lm(), progress=False)
    assert r["train_examples"] == len(pack(load_examples(data, tiny_tokenizer(), 32), 32, boundaries=True))
    assert r["eval_after"]["eval_loss"] < r["eval_before"]["eval_loss"]


@pytest.mark.parametrize("hardware", [True, False])
def test_bf16_by_default_where_the_cpu_has_it(tmp_path, data, monkeypatch, hardware):
    """bf16=None: autocast on exactly where the CPU multiplies bf16 in hardware (recorded in the run's arguments)."""
    import attnkit.train.finetune as ft

    monkeypatch.setattr(ft, "native_bf16", lambda: hardware)
    seen = []
    monkeypatch.setattr(ft, "autocast", lambda bf16: seen.append(bf16) or torch.autocast("cpu", enabled=False))
    args = FinetuneArgs(method="lora", data=data, eval_data=data, steps=1, batch_size=2, eval_every=0, seq_len=32)
    assert args.bf16 is None
    finetune(args, tmp_path / "run", lm=tiny_lm(), progress=False)
    assert json.loads((tmp_path / "run" / "finetune_args.json").read_text())["bf16"] is hardware
    assert seen and set(seen) == {hardware}


def test_cli(tmp_path, data, monkeypatch, capsys):
    import attnkit.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda path=None, dtype=None, quantize=None: tiny_lm())
    out = tmp_path / "run"
    rc = main(["finetune", "--method", "prompt", "--data", data, "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--num-virtual-tokens", "2", "--quiet", "--eval-every", "0"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert main(["finetune", "--method", "lora", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main(["finetune", "--method", "dora", "--data", data, "--out", str(out)]) == 2


@pytest.mark.parametrize("quantize", [None, "gguf"])
def test_a_quantized_base_trains_with_freed_memory_returned_and_evaluates_at_the_micro_batch(tmp_path, data, monkeypatch,
                                                                                            quantize):
    import attnkit.train.finetune as ft

    calls, batches = [], []
    monkeypatch.setattr(ft, "return_freed_memory", lambda: calls.append(1) or True)
    released = []
    monkeypatch.setattr(ft, "release_scratch", lambda: released.append(1))
    evaluate = ft.evaluate_loss
    monkeypatch.setattr(ft, "evaluate_loss", lambda *a, **kw: batches.append(kw["batch_size"]) or evaluate(*a, **kw))
    args = FinetuneArgs(method="lora", data=data, eval_data=data, steps=2, batch_size=2, warmup=0, eval_every=0,
                        seq_len=32, quantize=quantize)
    finetune(args, tmp_path / "run", lm=tiny_lm(), progress=False)
    assert calls == ([1] if quantize else [])  # QLoRA: glibc gives freed temporaries back (kernels/allocator.py)
    assert batches == [2, 2]  # before and after: never more rows at once than a training micro-batch
    assert released == ([1, 1] if quantize else [])  # QLoRA: each evaluation's decoded-weight buffer freed after it


def test_release_scratch_frees_the_decoded_weight_buffer():
    from attnkit.nn import scratch
    from attnkit.quant import native

    buf = native._scratch(64, 32)
    assert scratch.held("dense.") and buf.shape == (64, 32)
    native.release_scratch()
    assert not scratch.held("dense.")
