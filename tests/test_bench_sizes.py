"""benchmarks/sizes.py's rounds: each figure the median over the rounds, the rounds kept, what is not a number
taken from the first round."""


def test_median_result_takes_each_number_over_the_rounds(load_benchmark):
    sizes = load_benchmark("sizes")
    runs = [{"decode_tok_s": 30.0, "prefill_512_tok_s": 200.0, "slots": "16", "ok": True},
            {"decode_tok_s": 60.0, "prefill_512_tok_s": 240.0, "slots": "16", "ok": True},
            {"decode_tok_s": 55.0, "slots": "16", "ok": False}]
    got = sizes.median_result(runs)
    assert got["decode_tok_s"] == 55.0  # the disturbed round (30) does not pull it down
    assert got["prefill_512_tok_s"] == 220.0  # two rounds have it: the mean of the middle two
    assert got["slots"] == "16" and got["ok"] is True  # not numbers: the first round's
    assert got["rounds"] == runs
