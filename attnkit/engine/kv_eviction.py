"""SnapKV (Li et al. 2024): a long prompt's K/V cut to a budget by what its last queries attend to.

Once a request with ``SamplingParams.kv_budget`` has read its prompt (after every prefill chunk with
``kv_budget_stream``; earlier where its cache would outgrow the context), if its cache holds more than the budget,
each layer's KV head keeps the ``budget`` keys that the last chunk's last queries (the *observation window*, up to
:data:`OBSERVATION` rows) weigh most, and the window's own keys:

    score_j = Σ_{queries i in the window} Σ_{query heads h of the KV head} softmax_j(q_{h,i}·k_j · scale)

plus its max-pool over :data:`POOL` neighbouring keys (SnapKV's clustering: a kept key brings its neighbours,
which keeps phrases whole; its own score ranks it before them). Every layer and head keeps its own tokens, in
their order; the kept rows move into new blocks (the engine's
:meth:`~attnkit.engine.model_runner.ModelRunner.compact`), each key re-rotated to its position in the compacted
cache (as StreamingLLM places its sinks), and later tokens follow at cache index ``position − kv_shift``. A prompt
of any length is then read chunk by chunk in memory bounded by the budget plus one chunk, which is also how a
stream is read with eviction (``kv_budget_stream``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBSERVATION = 32  # the last queries of a chunk whose attention scores the keys
POOL = 7  # neighbouring keys max-pooled together


def snapkv_keep(q_obs: torch.Tensor, k: torch.Tensor, q_index: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
    """Which keys each KV head keeps.

    q_obs (nh, m, hd): the observation window's queries, at cache indices ``q_index`` (m,); k (n_kv, L, hd): the
    sequence's keys in cache order. Returns (n_kv, budget) ascending cache indices: the last m keys (the window)
    and the budget − m best scored of the others.
    """
    nh, m, _ = q_obs.shape
    n_kv, L, _ = k.shape
    g = nh // n_kv
    scores = torch.einsum("kgmd,kld->kgml", q_obs.float().view(n_kv, g, m, -1), k.float()) * scale
    visible = torch.arange(L, device=k.device)[None, :] <= q_index[:, None]  # (m, L): causal
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # (n_kv, g, m, L)
    weight = probs.sum((1, 2))  # (n_kv, L)
    weight = weight + F.max_pool1d(weight[:, None], POOL, stride=1, padding=POOL // 2)[:, 0]  # own score: ties
    recent = min(m, budget)
    weight[:, L - recent:] = float("inf")  # the window keeps itself
    return weight.topk(budget, dim=-1).indices.sort(dim=-1).values
