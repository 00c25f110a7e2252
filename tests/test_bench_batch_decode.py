"""benchmarks/batch_decode.py: each batch size's figure the median over the rounds that measured it, failed rounds
left out; llama-batched-bench's jsonl read per batch size."""

import subprocess


def test_median_over_the_rounds_without_the_failed_ones(load_benchmark):
    bd = load_benchmark("batch_decode")
    rounds = [{"1": 40.0, "4": 90.0}, {"error": "timed out"}, {"1": 50.0, "4": 100.0}, {"1": 45.0}]
    assert bd.median_by_batch(rounds, [1, 4, 16]) == {"1": 45.0, "4": 95.0}
    assert bd.median_by_batch([{"error": "x"}], [1]) == {}


def test_llama_batched_bench_output_is_read_per_batch_size(load_benchmark, monkeypatch, tmp_path):
    bd = load_benchmark("batch_decode")
    lines = ['main: n_kv_max = 4096', '{"pl": 1, "speed_tg": 41.6, "speed_pp": 138.6}',
             '{"pl": 4, "speed_tg": 66.3, "speed_pp": 151.8}']
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="\n".join(lines), stderr="")

    monkeypatch.setattr(bd.subprocess, "run", fake_run)
    assert bd.run_llama(tmp_path / "llama-batched-bench", "m.gguf", [1, 4], 32, 16, 2, 60) == {"1": 41.6, "4": 66.3}
    assert seen["cmd"][seen["cmd"].index("-npl") + 1] == "1,4" and "jsonl" in seen["cmd"]
    monkeypatch.setattr(bd.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "bad model"))
    assert bd.run_llama(tmp_path / "x", "m.gguf", [1], 32, 16, 2, 60) == {"error": "bad model"}
