"""benchmarks/speculative.py: configurations run in turn round after round, each workload's figure the median over
the rounds, and every round's tokens checked against the run without speculation."""

import json


def fake_result(config: str, tok_s: float, ids: list[int]) -> dict:
    ws = ("grounded_1", "grounded_16", "chat", "offline")
    return {"model": "m.gguf", "torch_threads": 2, "layers": 30,
            "workloads": {w: {"out_tok_s": tok_s, "seconds": 1.0, "acceptance_rate": None,
                              "mean_accepted_length": None} for w in ws},
            "token_ids": {w: [ids] for w in ws}}


def test_rounds_alternate_the_configurations_and_report_medians(load_benchmark, monkeypatch, tmp_path, capsys):
    sp = load_benchmark("speculative")
    order, speeds = [], {"none": iter([100.0, 80.0, 90.0]), "ngram": iter([120.0, 150.0, 130.0])}

    def fake_child(config, args):
        order.append(config)
        ids = [1, 2, 3] if config == "none" or len(order) < 6 else [1, 2, 4]  # the last ngram run differs
        return fake_result(config, next(speeds[config]), ids)

    monkeypatch.setattr(sp, "run_child", fake_child)
    out = tmp_path / "r.json"
    monkeypatch.setattr(sp.sys, "argv", ["speculative.py", "--configs", "none,ngram", "--rounds", "3", "--json", str(out)])
    assert sp.main() == 1  # a request whose tokens differ from the plain engine's fails the run
    assert order == ["none", "ngram"] * 3
    rep = json.loads(out.read_text())
    assert rep["rounds"] == 3
    assert rep["results"]["none"]["workloads"]["chat"]["out_tok_s"] == 90.0
    assert rep["results"]["ngram"]["workloads"]["chat"]["out_tok_s"] == 130.0
    assert [r["out_tok_s"] for r in rep["results"]["ngram"]["workloads"]["offline"]["rounds"]] == [120.0, 150.0, 130.0]
    assert rep["ratio_vs_none"]["ngram"]["grounded_1"] == 130.0 / 90.0
    assert rep["results"]["ngram"]["differing_requests"] == 4  # one request in each of the 4 workloads, round 3
    assert rep["results"]["none"]["differing_requests"] == 0
