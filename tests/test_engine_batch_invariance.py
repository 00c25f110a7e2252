"""Batch invariance on the default fast path (issue 14): a request's greedy tokens are the same whether it
runs alone or inside a batch of others, whatever the batch does to its prompt's chunking. Each row's
product is chosen by what the row is (a prompt row or a generated token: attnkit.quant.row_kernel), and each
kernel computes a row on its own, so nothing a neighbour does can reach it."""

from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import skip_module_without_default_model

skip_module_without_default_model()

from attnkit import LLM  # noqa: E402
from attnkit.engine import SamplingParams  # noqa: E402


def _requests(n: int = 16, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Mixed requests: prompts of 1 to 300 tokens (several longer than a step's token budget below, so that
    together they are cut into other chunks than alone), 4 to 40 new tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 3, 8, 9, 17, 40, 64, 130, 300]) if i % 4 else rng.randint(1, 300)
        prompt = [rng.randrange(1000, 40000) for _ in range(length)]
        out.append((prompt, SamplingParams(temperature=0, max_tokens=rng.randint(4, 40), ignore_eos=True)))
    return out


@pytest.mark.slow
def test_greedy_tokens_are_the_same_alone_and_in_a_batch():
    reqs = _requests()
    # a small step budget: together, prompts are split across steps and share them with decode rows
    llm = LLM(max_num_batched_tokens=160, enable_prefix_caching=False)
    alone = [llm.generate(p, s)[0].outputs[0].token_ids for p, s in reqs]
    together = [o.outputs[0].token_ids for o in llm.generate([p for p, _ in reqs], [s for _, s in reqs])]
    differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not differ, f"{len(differ)} of {len(reqs)} requests changed in a batch (first: #{differ[0]}, " \
                       f"alone {alone[differ[0]]}, together {together[differ[0]]})"
    # and with the prefix cache on, against the same engine's cached prompts
    cached = LLM(max_num_batched_tokens=512)
    first = [o.outputs[0].token_ids for o in cached.generate([p for p, _ in reqs[:10]], [s for _, s in reqs[:10]])]
    again = [o.outputs[0].token_ids for o in cached.generate([p for p, _ in reqs], [s for _, s in reqs])]
    assert again[:10] == first and again == alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prompt_rows_dense_product_is_the_same_for_any_row_count(dtype):
    """The engine's prompt rows take the dense product on the decoded blocks: each row's result must not depend
    on how many rows share the call (oneDNN switches methods for few rows; the layer pads those)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from attnkit.kernels import library
    from attnkit.quant.native import GGUFBlockLinear
    from attnkit.quant.row_kernel import rows_are

    if library() is None:
        pytest.skip("no C compiler: the kernels could not be built")
    g = torch.Generator().manual_seed(0)
    for n, k in ((2048, 2048), (960, 576)):
        w = (torch.randn(n, k, generator=g) * 0.05).numpy()
        layer = GGUFBlockLinear(torch.from_numpy(quantize(w, T.Q8_0)), "Q8_0", k)
        layer.dense_dtype = dtype
        x = torch.randn(40, k, generator=g)
        with rows_are("prompt"):
            full = layer(x)
            for m in (1, 2, 3, 5, 9, 10, 11, 15, 16, 17, 33):
                assert torch.equal(layer(x[:m]), full[:m]), (n, k, m, dtype)
