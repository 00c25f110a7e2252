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


def test_attnkits_kv_pool_is_llama_servers_context(load_benchmark):
    """Peak RSS compares the same context: attnkit's K/V pool holds what llama-server's -c does at one slot per
    offline request (slots × the longest request), or the single-stream tests' longest prompt and its new tokens."""
    sizes = load_benchmark("sizes")
    w = {"offline": [([1] * 100, 28), ([1] * 40, 60), ([1] * 10, 5)], "single": [[1] * 32, [1] * 512], "single_new": 32}
    assert sizes.context_tokens(w) == 512 + 32  # more than 3 requests × 128: the 512-token prompt and its new tokens
    w["single"] = [[1] * 32, [1] * 64]
    assert sizes.context_tokens(w) == 3 * 128
