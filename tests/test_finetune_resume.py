"""`attnkit finetune --resume` continues the same run: a run SIGKILLed in the middle of writing a checkpoint
resumes from its last complete one with nothing but ``--out R --resume`` (data, steps and recipe come from
the run directory) and ends with the weights of an uninterrupted run; overrides are announced or refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnkit.cli import main
from attnkit.data.sft_tasks import write_jsonl
from attnkit.train.checkpoint import KILL_ENV
from attnkit.train.finetune import FinetuneArgs, finetune, resume_args
from attnkit.train.hf_export import save_hf_llama

from finetune_helpers import chat_rows, tiny_lm

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY, KILL_AT = 12, 3, 3  # killed inside the 3rd save (step 9): the step-6 checkpoint must survive
RECIPE = dict(steps=STEPS, save_every=SAVE_EVERY, batch_size=3, lr=1e-2, warmup=2, eval_every=0, seed=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny HF model directory, the data, a CLI run SIGKILLed at the worst moment of a checkpoint save (the
    previous checkpoint renamed away, the new one complete but not yet in place), and meanwhile, in this
    process, the same run uninterrupted."""
    root = tmp_path_factory.mktemp("resume")
    lm = tiny_lm()
    save_hf_llama(lm.model, lm.tokenizer, root / "model")
    data = write_jsonl(root / "train.jsonl", chat_rows(12))
    flags = [a for k, v in RECIPE.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "attnkit.cli", "finetune", "--model", str(root / "model"), "--data", str(data),
           "--out", str(root / "killed"), "--threads", "1", "--quiet", *flags]
    env = {**os.environ, KILL_ENV: f"moved:{KILL_AT}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finetune(FinetuneArgs(model=str(root / "model"), data=str(data), **RECIPE), root / "straight", progress=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.decode()[-2000:])
    return root


def _step(ckpt: Path) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


def test_checkpoint_never_half_written(runs):
    R = runs / "killed"
    assert not (R / "checkpoint").exists()  # killed between the two renames of a save
    old = R / ".checkpoint.old"  # the previous checkpoint, whole
    assert _step(old) == 2 * SAVE_EVERY
    tensors = load_file(str(old / "trainable.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert load_file(str(old / "optimizer.safetensors")).keys() == {f"{n}::{k}" for n in tensors
                                                                      for k in ("step", "exp_avg", "exp_avg_sq")}


def test_resume_with_only_out_equals_the_uninterrupted_run(runs, capsys):
    """``--out R --resume`` (and an evaluation option, announced): data, steps and recipe from R."""
    R = runs / "killed"
    assert main(["finetune", "--out", str(R), "--resume", "--threads", "1", "--eval-every", "6"]) == 0
    out, err = capsys.readouterr()
    assert "resume: --eval-every 6 overrides the run's 0" in err  # evaluation only: the weights stay the same
    assert f"at step {2 * SAVE_EVERY} of {STEPS}" in err and json.loads(out)["steps"] == STEPS
    assert _step(R / "checkpoint") == STEPS and not list(R.glob(".checkpoint.*"))  # leftovers cleared
    resumed = load_file(str(R / "adapter" / "adapter_model.safetensors"))
    straight = load_file(str(runs / "straight" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys() and resumed
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=0, msg=k)


def test_resume_overrides_are_named_and_breaking_ones_refused(runs, capsys):
    R = runs / "killed"
    args, changed = resume_args(R, {"steps": 20, "save_every": SAVE_EVERY, "lr": 5e-3})
    assert changed == {"steps": (STEPS, 20), "lr": (1e-2, 5e-3)}  # save_every: the run's own value, not reported
    assert args.data.endswith("train.jsonl") and args.seed == 1 and args.batch_size == 3
    for flag, value in (("--r", "4"), ("--method", "ia3"), ("--model", str(runs))):
        assert main(["finetune", "--out", str(R), "--resume", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}: the run in" in err and "drop the option" in err
    assert main(["finetune", "--out", str(runs / "nowhere"), "--resume"]) == 2
    assert "finetune_args.json: missing" in capsys.readouterr().err


def test_a_run_saved_before_best_fit_packing_resumes_with_rows_in_order(tmp_path):
    saved = FinetuneArgs(data="train.jsonl", packing=True).to_dict()
    del saved["packing_strategy"]  # finetune_args.json as runs wrote it before the option
    (tmp_path / "finetune_args.json").write_text(json.dumps(saved))
    args, changed = resume_args(tmp_path, {})
    assert args.packing_strategy == "order" and changed == {}
    assert FinetuneArgs(data="train.jsonl").packing_strategy == "bfd"  # new runs
