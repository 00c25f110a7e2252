"""The operation counts behind benchmarks/parallelism.py, checked by hand and against torch's FLOP counter.

FlopCounterMode counts 2 FLOPs per multiply-accumulate of every matmul/addmm/bmm it sees; the
analytic functions count MACs, so reference = 2 × B × ours. Attention runs with impl="math"
here because the counter does not see inside torch's fused CPU SDPA kernel.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnkit.analysis import flops as F
from attnkit.models.transformer import Seq2SeqConfig, Seq2SeqTransformer
from attnkit.nn import MultiHeadAttention, TransformerLayer

torch.manual_seed(0)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fn()
    return fc.get_total_flops()


def use_math(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.impl = "math"
    return module


# -- by hand ------------------------------------------------------------------------------------
def test_hand_computed_counts():
    # n=3, d=4: projections 4·3·16 = 192, scores 9·4 = 36, weights·V 36
    assert F.mha_macs(3, 3, 4, 1) == {"q_proj": 48, "k_proj": 48, "v_proj": 48, "scores": 36,
                                      "weighted_sum": 36, "o_proj": 48, "total": 264}
    assert F.self_attention_macs(3, 4, n_heads=2) == 264  # heads do not change the count
    assert F.ffn_macs(3, 4, 16) == 2 * 3 * 4 * 16
    assert F.lstm_layer_macs(3, 4, 4) == 8 * 3 * 16 == 384
    assert F.lstm_layer_macs(3, 4, 2, bidirectional=True) == 2 * 3 * 4 * 2 * 6
    assert F.encoder_layer_macs(3, 4, 2, 16) == 264 + 384


def test_crossovers():
    c = F.crossovers(256, 1024)
    assert c.scores_vs_recurrence == 256  # n²d = nd²
    assert c.attention_sublayer_vs_lstm == 512  # 4nd² + 2n²d = 8nd²
    assert c.encoder_layer_vs_lstm is None  # 12nd² + 2n²d > 8nd² for every n
    assert F.crossovers(256, 256).encoder_layer_vs_lstm == 256
    d = 256
    for n in (511, 512, 513):  # the sublayer crossover really is where the counts meet
        att, rnn = F.self_attention_macs(n, d), F.lstm_layer_macs(n, d, d)
        assert (att > rnn) == (n > 512) and (att == rnn) == (n == 512)


def test_sequential_steps():
    assert F.sequential_steps("attention", 1024) == 1
    assert F.sequential_steps("transformer_encoder", 1024, n_layers=6) == 6
    assert F.sequential_steps("lstm", 1024) == 1024
    assert F.sequential_steps("lstm", 1024, n_layers=2) == 1025
    assert F.sequential_steps("decoder_inference", 20, n_layers=6) == 120
    with pytest.raises(ValueError, match="unknown kind"):
        F.sequential_steps("cnn", 3)


def test_seed_003_arithmetic_versus_the_real_count():
    assert F.seed_003_claim(512, 8) == {"one_head": 262144, "multi_head": 32768}  # the article's "8× less"
    for n in (1, 64, 1000):
        one, eight = F.mha_macs(n, n, 512, 1), F.mha_macs(n, n, 512, 8)
        assert one == eight  # every term, not only the total
    assert F.softmax_elements(100, 100, 8) == 8 * F.softmax_elements(100, 100, 1)


# -- against torch.utils.flop_counter on the real modules ---------------------------------------
@pytest.mark.parametrize("n_q,n_k,d,h,n_kv", [(10, 10, 64, 4, None), (10, 10, 64, 1, None), (7, 13, 32, 4, 2),
                                              (5, 5, 32, 4, 1)])
def test_mha_matches_flop_counter(n_q, n_k, d, h, n_kv):
    B = 2
    m = MultiHeadAttention(d, h, n_kv_heads=n_kv, impl="math").eval()
    x, ctx = torch.randn(B, n_q, d), torch.randn(B, n_k, d)
    ref = counted(lambda: m(x, context=ctx))
    assert ref == 2 * B * F.mha_macs(n_q, n_k, d, h, n_kv_heads=n_kv)["total"]


def test_eight_heads_of_64_cost_what_one_head_of_512_costs():
    B, n = 1, 48
    x = torch.randn(B, n, 512)
    eight = counted(lambda: MultiHeadAttention(512, 8, impl="math")(x))
    one = counted(lambda: MultiHeadAttention(512, 1, impl="math")(x))
    assert eight == one == 2 * B * (4 * n * 512 ** 2 + 2 * n * n * 512)


def test_encoder_layer_matches_flop_counter():
    B, n, d, h, dff = 2, 12, 32, 4, 128
    layer = TransformerLayer(d, h, dff, impl="math").eval()
    x = torch.randn(B, n, d)
    assert counted(lambda: layer(x)) == 2 * B * F.encoder_layer_macs(n, d, h, dff)


def test_lstm_layer_matches_flop_counter_on_the_unrolled_recurrence():
    """nn.LSTM's fused CPU kernel is opaque to the counter; unroll it with LSTMCell (same weights,
    same outputs) and count that: n steps of 4·d_h·(d_in + d_h) MACs."""
    B, n, d_in, d_h = 3, 9, 16, 24
    lstm = torch.nn.LSTM(d_in, d_h, batch_first=True)
    cell = torch.nn.LSTMCell(d_in, d_h)
    with torch.no_grad():
        for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                     ("bias_hh", "bias_hh_l0")):
            getattr(cell, a).copy_(getattr(lstm, b))
    x = torch.randn(B, n, d_in)

    def unrolled():
        h = c = torch.zeros(B, d_h)
        outs = []
        for t in range(n):
            h, c = cell(x[:, t], (h, c))
            outs.append(h)
        return torch.stack(outs, 1)

    with torch.no_grad():
        assert torch.allclose(unrolled(), lstm(x)[0], atol=1e-6)
    assert counted(unrolled) == 2 * B * F.lstm_layer_macs(n, d_in, d_h)


def _decoder_model():
    cfg = Seq2SeqConfig(src_vocab_size=50, tgt_vocab_size=40, d_model=32, n_heads=4, n_encoder_layers=1,
                        n_decoder_layers=2, d_ff=64, dropout=0.0)
    return use_math(Seq2SeqTransformer(cfg).eval()), cfg


def test_decoder_parallel_pass_matches_flop_counter():
    model, cfg = _decoder_model()
    B, S, n = 2, 6, 9
    src, tgt = torch.randint(3, 50, (B, S)), torch.randint(3, 40, (B, n))
    with torch.no_grad():
        memory, src_mask = model.encode(src)
    ref = counted(lambda: model.decode(tgt, memory, src_mask))
    assert ref == 2 * B * F.decoder_parallel_macs(n, S, 32, 4, 64, 2, 40)


@pytest.mark.parametrize("cache", [True, False])
def test_decoder_inference_matches_flop_counter(cache):
    model, cfg = _decoder_model()
    B, S, n = 2, 6, 7
    src, tgt = torch.randint(3, 50, (B, S)), torch.randint(3, 40, (B, n))
    with torch.no_grad():
        memory, src_mask = model.encode(src)

    def run():
        if cache:
            kv = model.init_cache(memory)
            for t in range(n):
                model.decode(tgt[:, t:t + 1], memory, src_mask, cache=kv)
        else:
            for t in range(1, n + 1):
                model.decode(tgt[:, :t], memory, src_mask)

    assert counted(run) == 2 * B * F.decoder_inference_macs(n, S, 32, 4, 64, 2, 40, cache=cache)
    with_cache = F.decoder_inference_macs(64, 32, 256, 4, 1024, 2, 1000, cache=True)
    without = F.decoder_inference_macs(64, 32, 256, 4, 1024, 2, 1000, cache=False)
    assert without > 10 * with_cache


# -- the benchmark's own helpers -----------------------------------------------------------------
def _load_bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "parallelism.py"
    spec = importlib.util.spec_from_file_location("bench_parallelism", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_crossover_interpolation():
    bench = _load_bench()
    ns = [32, 64, 128, 256]
    assert bench.first_crossing(ns, [1, 2, 5, 9], [2, 3, 4, 5]) == pytest.approx(64 + 64 * (1 / 2))
    assert bench.first_crossing(ns, [1, 2, 3, 4], [2, 3, 4, 5]) is None
    assert bench.first_crossing(ns, [3, 2, 3, 4], [2, 3, 4, 5]) == 32  # already above at the first n
