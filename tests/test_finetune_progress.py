"""What a person watching a fine-tuning run sees: a progress bar with the loss, tokens/s, the eval loss and
the ETA, eval losses on the held-out split, and tokens/s in the trainer state."""

from __future__ import annotations

import json

from attnkit.data.sft_tasks import write_jsonl
from attnkit.train.finetune import FinetuneArgs, finetune

from finetune_helpers import chat_rows, tiny_lm


def test_progress_bar_and_eval_split(tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "d.jsonl", chat_rows(20)))
    args = FinetuneArgs(data=data, steps=4, batch_size=4, lr=1e-2, warmup=1, eval_every=2, eval_fraction=0.25)
    r = finetune(args, tmp_path / "run", lm=tiny_lm(), progress=True)
    err = capsys.readouterr().err
    assert "15 training rows, 5 eval rows" in err  # the last quarter held out
    bar = [line for line in err.replace("\r", "\n").splitlines() if "4/4" in line][-1]
    assert all(k in bar for k in ("loss=", "tok/s=", "eval=", "<00:00")), bar  # ... and the ETA (remaining time)
    assert [e["step"] for e in json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["evals"]] == [0, 2, 4]
    assert "step 2: eval loss" in err and r["eval_examples"] == 5
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert all(h["tokens_per_s"] > 0 for h in state["history"])
