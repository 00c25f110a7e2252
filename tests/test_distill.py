"""Distillation loss (against its definition and HF-free reference math), layer dropping, Block
Influence, the HF export of a student, and a tiny end-to-end progressive shrink."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from attnkit.cli import main
from attnkit.data.sft_tasks import write_jsonl
from attnkit.loading import load_causal_lm
from attnkit.train.distill import DistillArgs, distill, distill_loss
from attnkit.train.hf_export import save_hf_llama
from attnkit.train.shrink import block_influence, by_importance, drop_layers, evenly_kept

from finetune_helpers import QA, tiny_lm


def test_distill_loss_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 2] = -100
    T, a = 3.0, 0.3
    keep = y[:, 1:] != -100
    ps, pt = F.softmax(s[:, :-1][keep] / T, -1), F.softmax(t[:, :-1][keep] / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -F.log_softmax(s[:, :-1][keep], -1).gather(1, y[:, 1:][keep][:, None]).mean()
    torch.testing.assert_close(distill_loss(s, t, y, T, a), a * T * T * kl + (1 - a) * ce)
    assert distill_loss(t, t, y, T, 1.0).abs() < 1e-6  # a student equal to its teacher has nothing to learn


def test_layer_selection_and_dropping():
    k = evenly_kept(30, 15)
    assert len(k) == 15 and k[0] == 0 and k[-1] == 29 and all(1 <= b - a <= 3 for a, b in zip(k, k[1:]))
    assert evenly_kept(4, 2) == [0, 3] and evenly_kept(5, 3) == [0, 2, 4]
    assert by_importance([0.1, 0.5, 0.2, 0.9], 2) == [1, 3]
    with pytest.raises(ValueError, match="cannot keep"):
        evenly_kept(4, 5)
    lm = tiny_lm()
    teacher = lm.model
    x = torch.tensor([[2, 4, 21, 17, 9, 19, 14, 18, 3]])
    student = drop_layers(teacher, [1])
    assert len(student.layers) == 1 and student.cfg.n_layers == 1 and len(teacher.layers) == 2
    assert torch.equal(student.layers[0].ffn.up_proj.weight, teacher.layers[1].ffn.up_proj.weight)
    assert student.layers[0].ffn.up_proj.weight is not teacher.layers[1].ffn.up_proj.weight  # a copy
    # dropping a layer = running the teacher without it
    with torch.no_grad():
        h = teacher.tok_embeddings(x)
        mask = torch.ones(9, 9, dtype=torch.bool).tril()
        h = teacher.layers[1](h, mask=mask, rotary=teacher.rotary, positions=torch.arange(9))
        ref = F.linear(teacher.norm(h), teacher.tok_embeddings.weight)
        torch.testing.assert_close(student(x), ref)
    bi = block_influence(teacher, [x])
    assert len(bi) == 2 and all(0 <= b <= 2 for b in bi)


def test_hf_export_round_trip(tmp_path):
    lm = tiny_lm()
    save_hf_llama(lm.model, lm.tokenizer, tmp_path / "s")
    back = load_causal_lm(tmp_path / "s")
    x = torch.tensor([[2, 4, 21, 17, 9, 19, 14, 18, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), lm.model(x))
    assert back.tokenizer.encode("what colour is the sky ?") == lm.tokenizer.encode("what colour is the sky ?")
    assert back.tokenizer.chat_template == lm.tokenizer.chat_template


def test_progressive_shrinking(tmp_path):
    torch.manual_seed(0)
    from attnkit.loading import CausalLM
    from attnkit.models.llama import Llama, LlamaConfig

    base = tiny_lm()
    teacher = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=128, tie_embeddings=True)).eval()
    lm = CausalLM(teacher, base.tokenizer, tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{q} {a}"} for q, a in QA * 6])
    args = DistillArgs(data=str(data), eval_data=str(data), stages="3,2", steps_per_stage=15, lr=3e-2, batch_size=4,
                       speed_tokens=4, selection="every-other")
    r = distill(args, tmp_path / "out", progress=False, lm=lm)
    assert [s["layers"] for s in r["stages"]] == [3, 2]
    assert r["stages"][-1]["params"] < r["stages"][0]["params"] < r["teacher"]["params"]
    for s in r["stages"]:
        assert s["eval_ppl"] < s["eval_ppl_after_drop"]  # distillation recovers part of what dropping lost
    assert json.loads((tmp_path / "out" / "distill_report.json").read_text())["stages"][1]["layers"] == 2
    student = load_causal_lm(tmp_path / "out" / "student")
    assert len(student.model.layers) == 2


def test_bad_stages():
    with pytest.raises(ValueError, match="decreasing layer counts"):
        DistillArgs(data="x", stages="2,3").stage_sizes(4)
    with pytest.raises(ValueError, match="selection"):
        DistillArgs(data="x", selection="random")


def test_cli_errors(tmp_path, capsys):
    assert main(["distill", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such data file" in capsys.readouterr().err
