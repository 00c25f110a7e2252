"""The command line: help, seq2seq commands, and clear errors for bad input."""

import subprocess
import sys

import pytest

from attnkit.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("seq2seq", "bench"):
        assert cmd in r.stdout


def test_tasks_listing(capsys):
    assert main(["seq2seq", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "reverse" in out and "dates" in out and "→" in out


def test_unknown_task_is_rejected_by_name():
    r = run("seq2seq", "train", "--task", "translate", "--out", "x")
    assert r.returncode == 2
    assert "invalid choice: 'translate'" in r.stderr


def test_missing_checkpoint_gives_message_not_traceback(tmp_path, capsys):
    assert main(["seq2seq", "eval", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint directory not found" in err and "Traceback" not in err


def test_train_translate_attention_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["seq2seq", "train", "--task", "dates", "--out", str(out), "--steps", "2", "--d-model", "16",
                 "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--eval-examples", "10", "--quiet"]) == 0
    assert '"exact_match"' in capsys.readouterr().out
    assert main(["seq2seq", "translate", str(out), "1987-03-14", "--beam", "2"]) == 0
    assert "1987-03-14\t→\t" in capsys.readouterr().out
    png = tmp_path / "att.png"
    assert main(["seq2seq", "attention", str(out), "1987-03-14", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
