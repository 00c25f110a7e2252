"""Analytic operation counts for attention, the FFN, the LSTM, and decoding — counted for *this* code.

Everything is counted in multiply-accumulates (MACs) of the matrix products, per sequence (batch 1;
multiply by B). ``torch.utils.flop_counter.FlopCounterMode`` reports FLOPs = 2 × MACs for the same
products (bias additions, softmax, norms and activations are not counted by either), and the tests
check these formulas against it on the real modules.

Self-attention over n tokens, width d, h heads of width d/h (MultiHeadAttention):
    Q, K, V, output projections       4 · n · d²
    scores QKᵀ (h heads × n × n × d/h)    n² · d
    weights · V                            n² · d
    total                              4nd² + 2n²d            (Vaswani et al. Table 1 keeps only n²d)
The number of heads does not appear: h heads of width d/h cost exactly what one head of width d
costs; only the softmax works on h·n² instead of n² scores.

LSTM layer, input width d_in, hidden width d_h, per token 4 gates × (W_ih·x + W_hh·h):
    4 · d_h · (d_in + d_h)  per token  →  8nd² for n tokens at equal width (Table 1: n·d²)
and n *sequential* steps, against O(1) sequential steps for a self-attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass


def mha_macs(n_q: int, n_k: int, d_model: int, n_heads: int, head_dim: int | None = None,
             n_kv_heads: int | None = None, kv_dim: int | None = None, project_q: bool = True,
             project_kv: bool = True) -> dict[str, int]:
    """MACs of one MultiHeadAttention call: n_q queries attending to n_k keys.

    project_kv=False: K and V are given (a KV cache holds them, or cross-attention K/V computed
    once), so only the new tokens' K/V — none here — are projected.
    """
    head_dim = d_model // n_heads if head_dim is None else head_dim
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    kv_dim = d_model if kv_dim is None else kv_dim
    inner = n_heads * head_dim
    out = {
        "q_proj": n_q * d_model * inner if project_q else 0,
        "k_proj": n_k * kv_dim * n_kv_heads * head_dim if project_kv else 0,
        "v_proj": n_k * kv_dim * n_kv_heads * head_dim if project_kv else 0,
        "scores": n_heads * n_q * n_k * head_dim,  # QKᵀ per head: (n_q × hd)·(hd × n_k)
        "weighted_sum": n_heads * n_q * n_k * head_dim,  # softmax(·)·V per head
        "o_proj": n_q * inner * d_model,
    }
    out["total"] = sum(out.values())
    return out


def softmax_elements(n_q: int, n_k: int, n_heads: int) -> int:
    """Score entries the softmax exponentiates: n_heads · n_q · n_k (h heads → h× more)."""
    return n_heads * n_q * n_k


def self_attention_macs(n: int, d: int, n_heads: int = 1) -> int:
    """4nd² + 2n²d, independent of n_heads."""
    return mha_macs(n, n, d, n_heads)["total"]


def ffn_macs(n: int, d: int, d_ff: int, gated: bool = False) -> int:
    """Position-wise FFN: 2·n·d·d_ff (3·n·d·d_ff for SwiGLU/GeGLU)."""
    return (3 if gated else 2) * n * d * d_ff


def encoder_layer_macs(n: int, d: int, n_heads: int, d_ff: int) -> int:
    """One TransformerLayer (self-attention + FFN): 4nd² + 2n²d + 2n·d·d_ff."""
    return self_attention_macs(n, d, n_heads) + ffn_macs(n, d, d_ff)


def lstm_layer_macs(n: int, d_in: int, d_hidden: int, bidirectional: bool = False) -> int:
    """One LSTM layer over n tokens: n · 4·d_h·(d_in + d_h), twice if bidirectional."""
    return (2 if bidirectional else 1) * n * 4 * d_hidden * (d_in + d_hidden)


def sequential_steps(kind: str, n: int, n_layers: int = 1) -> int:
    """Operations that must wait for the previous one (critical path in layer applications).

    'attention' / 'transformer_encoder' / 'transformer_decoder_train': each layer is one parallel
    step over all n tokens → n_layers. 'lstm' (encoder or teacher-forced decoder): step t needs
    h_{t-1} → n per layer; with a wavefront schedule across layers the path is n + n_layers − 1.
    'decoder_inference' (either architecture): token t+1 needs token t → n steps, each through
    all layers → n · n_layers.
    """
    if kind in ("attention", "transformer_encoder", "transformer_decoder_train"):
        return n_layers
    if kind == "lstm":
        return n + n_layers - 1
    if kind == "decoder_inference":
        return n * n_layers
    raise ValueError(f"unknown kind {kind!r}")


@dataclass(frozen=True)
class Crossovers:
    """Sequence lengths n at which attention's count first exceeds an LSTM layer's (equal width d)."""

    scores_vs_recurrence: float  # Table 1's comparison: n²·d vs n·d²  →  n = d
    attention_sublayer_vs_lstm: float  # 4nd² + 2n²d vs 8nd²  →  n = 2d
    encoder_layer_vs_lstm: float | None  # + FFN 2nd·d_ff:  n = 2d − d_ff; None: attention layer always costs more


def crossovers(d: int, d_ff: int) -> Crossovers:
    n_layer = 2 * d - d_ff
    return Crossovers(scores_vs_recurrence=float(d), attention_sublayer_vs_lstm=float(2 * d),
                      encoder_layer_vs_lstm=float(n_layer) if n_layer > 0 else None)


def decoder_layer_macs(n_new: int, n_past: int, n_src: int, d: int, n_heads: int, d_ff: int,
                       cross_kv_given: bool) -> int:
    """One DecoderLayer call on n_new tokens whose self-attention also sees n_past cached positions.

    Masked self-attention: the code computes the full (n_new × (n_past+n_new)) score block and
    masks it, so a causal mask does not halve the count. Cross-attention: K/V of the n_src memory
    positions are projected here unless ``cross_kv_given`` (computed once by ``init_cache``).
    """
    n_k = n_past + n_new
    # only the new tokens' K and V are projected (the cache holds the n_past older ones)
    self_total = mha_macs(n_new, n_k, d, n_heads, project_kv=False)["total"] + 2 * n_new * d * d
    cross = mha_macs(n_new, n_src, d, n_heads, project_kv=not cross_kv_given)["total"]
    return self_total + cross + ffn_macs(n_new, d, d_ff)


def decoder_parallel_macs(n: int, n_src: int, d: int, n_heads: int, d_ff: int, n_layers: int,
                          vocab: int) -> int:
    """Teacher forcing: ``decode(tgt_in[:, :n], memory, src_mask)`` once, all n positions in parallel."""
    return n_layers * decoder_layer_macs(n, 0, n_src, d, n_heads, d_ff, cross_kv_given=False) + n * d * vocab


def decoder_inference_macs(n: int, n_src: int, d: int, n_heads: int, d_ff: int, n_layers: int, vocab: int,
                           cache: bool) -> int:
    """n sequential steps. cache=True: ``init_cache`` (memory K/V once) then one new token per step;
    cache=False: step t re-runs ``decode`` on the whole prefix of t tokens (and re-projects the memory
    K/V and recomputes logits for all t positions, as the code does)."""
    total = 0
    if cache:
        total += n_layers * 2 * n_src * d * d  # init_cache: K and V of the memory, once per layer
        for t in range(1, n + 1):
            total += n_layers * decoder_layer_macs(1, t - 1, n_src, d, n_heads, d_ff, cross_kv_given=True)
            total += d * vocab
    else:
        for t in range(1, n + 1):
            total += decoder_parallel_macs(t, n_src, d, n_heads, d_ff, n_layers, vocab)
    return total


def seed_003_claim(d_model: int = 512, n_heads: int = 8) -> dict[str, int]:
    """The arithmetic of seed article 003: 'one head costs d·d, h heads cost h·(d/h)²', i.e. h× less."""
    hd = d_model // n_heads
    return {"one_head": d_model * d_model, "multi_head": n_heads * hd * hd}
