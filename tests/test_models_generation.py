"""The decode loop's sampling rules: greedy, temperature, top-k, top-p (nucleus), seeds, stopping."""

from __future__ import annotations

import math
from collections import Counter

import torch

from attnkit.decoding.generate import SamplingParams, generate, sample

PROBS = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
LOGITS = PROBS.log()


def _freq(p: SamplingParams, n: int = 4000) -> Counter:
    g = torch.Generator().manual_seed(0)
    return Counter(sample(LOGITS, p, g) for _ in range(n))


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0.0)) == 1
    assert sample(LOGITS, SamplingParams(temperature=1.0, top_k=1)) == 1


def test_temperature_one_samples_the_distribution():
    f = _freq(SamplingParams(temperature=1.0))
    for i, p in enumerate(PROBS.tolist()):
        assert abs(f[i] / 4000 - p) < 0.03


def test_top_k_keeps_the_k_most_likely_renormalised():
    f = _freq(SamplingParams(temperature=1.0, top_k=2))
    assert set(f) == {1, 3}
    assert abs(f[1] / 4000 - 0.4 / 0.7) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), ... — 0.4 < 0.6 so id 3 is needed, 0.7 ≥ 0.6 so it stops there
    f = _freq(SamplingParams(temperature=1.0, top_p=0.6))
    assert set(f) == {1, 3}
    assert set(_freq(SamplingParams(temperature=1.0, top_p=0.3))) == {1}  # the top token is always kept
    assert set(_freq(SamplingParams(temperature=1.0, top_p=0.86))) == {1, 2, 3, 4}


def test_low_temperature_sharpens():
    f = _freq(SamplingParams(temperature=0.1), n=500)
    assert f[1] / 500 > 0.9 and not math.isclose(f[1] / 500, 0.4, abs_tol=0.1)


class _Counter(torch.nn.Module):
    """A fake LM whose next token is always (last token + 1) mod V, to check the loop's bookkeeping."""

    V = 10

    def new_cache(self):
        return [[]]

    def forward(self, idx, cache=None, last_only=False):
        cache[0].append(idx.shape[1])
        logits = torch.full((1, 1, self.V), -1e9)
        logits[0, 0, (int(idx[0, -1]) + 1) % self.V] = 0.0
        return logits


def test_generate_stops_and_uses_the_cache():
    m = _Counter()
    assert list(generate(m, [3], SamplingParams(max_new_tokens=20), stop_ids={7})) == [4, 5, 6, 7]
    assert list(generate(m, [3], SamplingParams(max_new_tokens=3))) == [4, 5, 6]
    assert list(generate(m, [1, 2, 3], SamplingParams(max_new_tokens=20), max_len=6)) == [4, 5, 6]


def test_seeded_sampling_is_reproducible():
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=123)

    class Flat(_Counter):
        def forward(self, idx, cache=None, last_only=False):
            return torch.zeros(1, 1, self.V)

    a, b = list(generate(Flat(), [0], p)), list(generate(Flat(), [0], p))
    c = list(generate(Flat(), [0], SamplingParams(max_new_tokens=30, temperature=1.0, seed=124)))
    assert a == b and a != c
