"""Sequence packing without cross-contamination (Krell et al. 2021, §3): packed examples attend only to
themselves with positions restarting at 0, so a packed batch's loss is the token-weighted mean of the
examples' losses run one by one — for the plain model, sliding windows, LoRA and prefix tuning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnkit.data.sft_tasks import write_jsonl
from attnkit.models.llama import Llama, packed_positions_and_mask
from attnkit.peft import METHODS, get_peft_model
from attnkit.train.finetune import FinetuneArgs, finetune, lm_loss
from attnkit.train.sft_data import IGNORE, collate, pack

from finetune_helpers import chat_rows, tiny_lm

EXAMPLES = [([1, 7, 9, 10, 11, 3], [1, 7, 9, 10, 11, 3]), ([2, 4, 21, 17, 9, 19, 14, 18, 3], [IGNORE] * 6 + [14, 18, 3]),
            ([1, 12, 13], [1, 12, 13]), ([2, 5, 30, 31, 32, 33, 3], [IGNORE, IGNORE, 30, 31, 32, 33, 3]),
            ([1, 40, 41, 42, 43], [1, 40, 41, 42, 43])]


def test_pack_keeps_examples_whole_with_document_ids():
    rows = pack(EXAMPLES, 16, boundaries=True)
    assert [r[2] for r in rows] == [[0] * 6 + [1] * 9, [0] * 3 + [1] * 7 + [2] * 5]
    assert rows[0][1][:7] == [IGNORE, 7, 9, 10, 11, 3, IGNORE]  # an example's first token is predicted by nothing
    x, y, d = collate(rows, pad_id=0)
    assert x.shape == (2, 15) and d[0, -1] == 1 and (y[0, 1:] != IGNORE).sum() == 5 + 3
    pos, mask = packed_positions_and_mask(d[:1], start=2)
    assert pos[0].tolist() == [2, 3, 4, 5, 6, 7] + list(range(2, 11))
    assert mask.shape == (1, 1, 15, 17) and mask[0, 0, :, :2].all() and not mask[0, 0, 6, 2 + 5]


def _model(kind: str) -> torch.nn.Module:
    lm = tiny_lm()
    if "window" in kind:  # a sliding window shorter than the examples: the window counts within each example
        model = Llama(dataclasses.replace(lm.model.cfg, layer_windows=[4, None]))
        model.load_state_dict(lm.model.state_dict())
        lm.model = model.eval()
    if kind == "lora":
        model = get_peft_model(lm.model, METHODS["lora"](r=4, lora_alpha=8))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)  # not the zero init: the adapter changes the output
        return model.eval()
    if kind.startswith("prefix"):  # its P keys are seen by every example, as a window allows
        return get_peft_model(lm.model, METHODS["prefix"](num_virtual_tokens=3, prefix_projection=False)).eval()
    return lm.model


@pytest.mark.parametrize("kind", ["plain", "window", "lora", "prefix", "prefix+window"])
def test_packed_loss_equals_the_examples_one_by_one(kind):
    model = _model(kind)
    x, y, d = collate(pack(EXAMPLES, 16, boundaries=True), pad_id=0)
    with torch.no_grad():
        logits = model(x, doc_ids=d)
        packed = lm_loss(logits, y)
        total, count, at = 0.0, 0, 0
        for ids, labels in EXAMPLES:
            xi, yi = collate([(ids, labels)], pad_id=0)
            alone = model(xi)
            total += float(lm_loss(alone, yi, reduction="sum"))
            count += int((yi[:, 1:] != IGNORE).sum())
            row, col = (0, at) if at + len(ids) <= 15 else (1, at - 15)
            torch.testing.assert_close(logits[row, col:col + len(ids)], alone[0], atol=1e-5, rtol=1e-5)
            at += len(ids)
        naive = float(lm_loss(model(x), y))  # without the ids the examples see each other
    assert abs(float(packed) - total / count) < 1e-5
    assert abs(naive - float(packed)) > 1e-3


def test_finetune_packs_with_boundaries(tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", chat_rows(12)))
    kw = dict(data=data, eval_data=data, steps=4, batch_size=2, lr=3e-2, warmup=1, eval_every=0, packing=True, seq_len=32)
    r = finetune(FinetuneArgs(**kw), tmp_path / "run", lm=tiny_lm(), progress=False)
    assert r["train_examples"] == 6  # 12 examples of 12–13 tokens, two to a row of 32
    assert r["eval_after"]["eval_loss"] < r["eval_before"]["eval_loss"]
    with pytest.raises(ValueError, match="drop --packing"):
        finetune(FinetuneArgs(method="prompt", **kw), tmp_path / "p", lm=tiny_lm(), progress=False)


def test_best_fit_decreasing_packs_every_example_whole_into_fewer_rows():
    def ex(n: int, start: int) -> tuple[list[int], list[int]]:
        return list(range(start, start + n)), list(range(start, start + n))

    small = [ex(6, 0), ex(5, 10), ex(4, 20), ex(5, 30)]  # in order: [6] [5 4] [5]; best fit: [6 4] [5 5]
    assert len(pack(small, 10, boundaries=True)) == 3
    assert [r[0] for r in pack(small, 10, boundaries=True, strategy="bfd")] == [small[0][0] + small[2][0], small[1][0] + small[3][0]]
    g = torch.Generator().manual_seed(0)
    many = [ex(int(n), 100 * i) for i, n in enumerate(torch.randint(1, 40, (200,), generator=g))]
    rows = pack(many, 64, boundaries=True, strategy="bfd")
    assert len(rows) < len(pack(many, 64, boundaries=True)) and all(len(r[0]) <= 64 for r in rows)
    found = sorted(tuple(ids[k] for k in range(len(ids)) if docs[k] == d) for ids, _, docs in rows for d in set(docs))
    assert found == sorted(tuple(e[0]) for e in many)  # each example once, whole, with its own document id
    with pytest.raises(ValueError, match="packing strategy"):
        pack(many, 64, boundaries=True, strategy="first-fit")
