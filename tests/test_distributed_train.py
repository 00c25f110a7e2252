"""Data-parallel fine-tuning and distillation on gloo, 2 processes joined as torchrun joins them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT): DDP and FSDP2 losses over 20 steps equal one process at the same global batch; a checkpoint
resumes at the other world size with the same losses; a rank that dies is named by the other, not waited for."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safetensors.torch import load_file

from attnkit.data.sft_tasks import write_jsonl
from attnkit.train.distill import DistillArgs, distill
from attnkit.train.distributed import RankFailure
from attnkit.train import finetune as ft
from attnkit.train.finetune import FinetuneArgs, finetune
from attnkit.train.sft_data import micro_batches

from finetune_helpers import WORDS, tiny_lm

STEPS, HALF = 20, 10
# the global batch: 4 rows × 2 micro-batches; at world 2 each rank takes 2 rows of each micro-batch
RECIPE = dict(steps=STEPS, grad_accum=2, lr=1e-2, warmup=2, eval_every=10, seed=1, method="lora",
              bf16=False)  # float32: the ranks' sums equal one process's to 1e-5 (bf16 rounds each alike only to ~1e-2)
FULL = dict(method="full", steps=8, lr=1e-3, bf16=False)  # every weight trained (tied embeddings too): FSDP shards the root
DISTILL = dict(stages="1", steps_per_stage=6, lr=1e-2, speed_tokens=2, selection="importance", seed=1)
DISTILL2 = dict(DISTILL, stages="2,1", steps_per_stage=4)  # two stages: the second drops from the sharded first's result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(root: Path) -> Path:
    """Prompt/completion rows of different lengths: the ranks' labelled-token counts differ."""
    rng = random.Random(0)
    words = WORDS[7:]
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(2, 12))),
             "completion": " ".join(rng.choices(words, k=rng.randint(1, 8)))} for _ in range(28)]
    return write_jsonl(root / "train.jsonl", rows)


def _args(root: Path, batch_size: int, **kw) -> FinetuneArgs:
    return FinetuneArgs(data=str(root / "train.jsonl"), batch_size=batch_size, **{**RECIPE, **kw})


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "checkpoint" / "trainer_state.json").read_text())["history"]]


def _train_jobs(rank: int, root: Path) -> None:
    """World 2, per-rank batch 2 (global 4): DDP straight; FSDP straight; DDP stopped at HALF (a copy left for a
    world-1 resume) and resumed; the world-1 run stopped at HALF resumed here; a DDP distillation; a two-stage FSDP
    distillation."""
    finetune(_args(root, 2), root / "ddp", progress=False, lm=tiny_lm())
    finetune(_args(root, 2, fsdp=True), root / "fsdp", progress=False, lm=tiny_lm())
    finetune(_args(root, 2, fsdp=True, **FULL), root / "fsdp_full", progress=False, lm=tiny_lm())
    finetune(_args(root, 2), root / "w2", progress=False, lm=tiny_lm(), stop_after=HALF)
    if rank == 0:
        shutil.copytree(root / "w2", root / "w2_to_w1")
    finetune(_args(root, 2), root / "w2", resume=True, progress=False, lm=tiny_lm())
    finetune(_args(root, 4), root / "w1_to_w2", resume=True, progress=False, lm=tiny_lm())  # batch 4 → 2 per rank
    r = distill(DistillArgs(data=str(root / "train.jsonl"), batch_size=2, **DISTILL), root / "distill2",
                progress=False, lm=tiny_lm())
    if rank == 0:
        (root / "distill2.json").write_text(json.dumps(r["stages"][0]["losses"]))
    r = distill(DistillArgs(data=str(root / "train.jsonl"), batch_size=2, fsdp=True, **DISTILL2), root / "distill2_fsdp",
                progress=False, lm=tiny_lm(n_layers=3))
    if rank == 0:
        (root / "distill2_fsdp.json").write_text(json.dumps([s["losses"] for s in r["stages"]]))


def _dying_job(rank: int, root: Path) -> None:
    """Rank 1 exits (os._exit, no goodbye) in its 3rd step; rank 0 must raise, naming it."""
    if rank == 1:
        calls = [0]
        real = torch.nn.utils.clip_grad_norm_

        def clip(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                (root / "died_at").write_text(repr(time.time()))
                os._exit(3)
            return real(*a, **k)
        torch.nn.utils.clip_grad_norm_ = clip
    finetune(_args(root, 2, dist_timeout=20.0), root / "dying", progress=False, lm=tiny_lm())


def _worker(port: int, port2: int, root: str, q) -> None:
    """Rank 1, joining as torchrun's workers do (env); then rank 1 of a second group, where it dies."""
    os.environ.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ft.plot_losses = lambda *a: None  # matplotlib: seconds, and not what is tested
    try:
        _train_jobs(1, Path(root))
        dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(port2)
        q.put("trained")
        _dying_job(1, Path(root) / "dying_group")
        q.put("rank 1 survived")
    except BaseException as e:  # noqa: BLE001 — reported to the test
        q.put(f"{type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """This process is rank 0 (its imports are paid for), one spawned process rank 1: first the world-1
    references (while rank 1 starts), then one group for the world-2 runs, then a second in which rank 1 dies."""
    root = tmp_path_factory.mktemp("dp")
    _data(root)
    (root / "dying_group").mkdir()
    shutil.copy(root / "train.jsonl", root / "dying_group" / "train.jsonl")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port, port2 = _free_port(), _free_port()
    proc = ctx.Process(target=_worker, args=(port, port2, str(root), q), daemon=True)
    proc.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ft, "plot_losses", lambda *a: None)
        try:
            finetune(_args(root, 4), root / "w1_to_w2", progress=False, lm=tiny_lm(), stop_after=HALF)
            finetune(_args(root, 4), root / "w1", progress=False, lm=tiny_lm())
            finetune(_args(root, 4, **FULL), root / "w1_full", progress=False, lm=tiny_lm())
            r = distill(DistillArgs(data=str(root / "train.jsonl"), batch_size=4, **DISTILL), root / "distill1",
                        progress=False, lm=tiny_lm())
            (root / "distill1.json").write_text(json.dumps(r["stages"][0]["losses"]))
            r = distill(DistillArgs(data=str(root / "train.jsonl"), batch_size=4, **DISTILL2), root / "distill1_2",
                        progress=False, lm=tiny_lm(n_layers=3))
            (root / "distill1_2.json").write_text(json.dumps([s["losses"] for s in r["stages"]]))
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                    timeout=timedelta(seconds=60))
            _train_jobs(0, root)
            dist.destroy_process_group()
            assert q.get(timeout=60) == "trained"
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port2}", rank=0, world_size=2,
                                    timeout=timedelta(seconds=20))
            with pytest.raises(RankFailure) as failure:
                _dying_job(0, root / "dying_group")
            dying = (str(failure.value), time.time())
            dist.destroy_process_group()
            proc.join(timeout=30)
            finetune(_args(root, 4), root / "w2_to_w1", resume=True, progress=False, lm=tiny_lm())  # per-rank 2 → 4
            yield root, (*dying, proc.exitcode)
        finally:
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()
            if proc.is_alive():
                proc.kill()


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and a, (len(a), len(b))
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, (worst, a, b)


def test_ddp_and_fsdp_losses_equal_one_process(runs):
    root = runs[0]
    ref = _losses(root / "w1")
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.5  # it learns: the comparison is not of constants
    _close(_losses(root / "ddp"), ref)
    _close(_losses(root / "fsdp"), ref)
    _close(_losses(root / "w2"), ref)  # stopped at HALF and resumed, at world 2
    _close(_losses(root / "fsdp_full"), _losses(root / "w1_full"))
    one, sharded = (load_file(str(root / r / "model.safetensors")) for r in ("w1_full", "fsdp_full"))
    assert one.keys() == sharded.keys()
    assert max(float((one[k] - sharded[k]).abs().max()) for k in one) < 1e-5
    evals = [json.loads((root / r / "metrics.json").read_text())["eval_after"]["eval_loss"] for r in ("w1", "ddp")]
    assert abs(evals[0] - evals[1]) < 1e-5
    _close(json.loads((root / "distill2.json").read_text()), json.loads((root / "distill1.json").read_text()))
    fsdp_stages, one_stages = (json.loads((root / f).read_text()) for f in ("distill2_fsdp.json", "distill1_2.json"))
    assert len(fsdp_stages) == len(one_stages) == 2
    for a, b in zip(fsdp_stages, one_stages):
        _close(a, b)


def test_resume_at_another_world_size(runs):
    root = runs[0]
    ref = _losses(root / "w1")
    _close(_losses(root / "w1_to_w2"), ref)  # steps 1–10 at world 1, 11–20 at world 2
    _close(_losses(root / "w2_to_w1"), ref)  # and the other way round
    state = json.loads((root / "w2_to_w1" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["global_batch"] == 4 and state["samples"] == 4 * 2 * STEPS


def test_a_dead_rank_is_named_not_waited_for(runs):
    root, (msg, t_end, exitcode) = runs
    assert exitcode == 3  # rank 1 left by os._exit(3) in its 3rd step's clipping
    assert "rank 0: the token-count all-reduce in step 4 failed: rank 1 stopped or failed" in msg, msg
    died = float((root / "dying_group" / "died_at").read_text())
    assert t_end - died < 10, t_end - died  # inside the 20 s timeout: the lost connection is seen, not waited out


def test_micro_batches_are_global():
    rows = [([i], [i]) for i in range(10)]
    one = [next(micro_batches(rows, 4, 0, 3, start=k))[0].flatten().tolist() for k in range(3)]
    two = [[next(micro_batches(rows, 2, 0, 3, start=k, rank=r, world=2))[0].flatten().tolist() for r in (0, 1)]
           for k in range(3)]
    assert [a + b for a, b in two] == one
    with pytest.raises(ValueError, match="cannot fill a global micro-batch of 12"):
        next(micro_batches(rows, 6, 0, 3, world=2))


def test_bad_launches_and_resumes_are_named(tmp_path, monkeypatch):
    from attnkit.train.distributed import init_distributed
    from attnkit.train.finetune import _resume_batch

    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two': not an integer"):
        init_distributed()
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        _args(tmp_path, 2, dist_timeout=0)
    with pytest.raises(ValueError, match="fsdp with quantize=nf4"):
        _args(tmp_path, 2, fsdp=True, quantize="nf4")
    run = {"global_batch": 6, "world_size": 2}
    assert _resume_batch(_args(tmp_path, 3), run, 1, named=False)[0].batch_size == 6
    assert _resume_batch(_args(tmp_path, 3), run, 3, named=False)[0].batch_size == 2
    assert _resume_batch(_args(tmp_path, 5), run, 1, named=True)[0].batch_size == 5  # named: the user's choice
    with pytest.raises(ValueError, match="global micro-batch is 6 rows .* world size 4 does not divide it"):
        _resume_batch(_args(tmp_path, 3), run, 4, named=False)
