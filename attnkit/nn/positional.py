"""Positional information: absolute encodings added to embeddings, and relative schemes applied
inside attention.

- Sinusoidal (Vaswani et al. 2017, §3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d)),
  PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
- Learned absolute (GPT-2, BERT): a trained table of one vector per position.
- Rotary, RoPE (Su et al. 2021): rotate each (x_i, x_{i+d/2}) pair of q and k by angle
  pos·θ_i, θ_i = base^(−2i/d) ("half-split" layout of Llama checkpoints), so q·k depends only on
  the offset between positions.
- ALiBi (Press et al. 2022): add −m_h·|i − j| to the scores of head h, with slopes m_h the
  geometric sequence 2^(−8/n), 2^(−16/n), … .
- T5 relative bias (Raffel et al. 2020, §2.1): a learned scalar per head and per bucket of the
  relative distance j − i; exact buckets for small distances, logarithmic ones up to max_distance.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The paper's table PE of shape (max_len, d_model)."""
    if d_model % 2 != 0:
        raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


class SinusoidalPositionalEncoding(nn.Module):
    """x + PE[offset : offset + T] for x of shape (B, T, d_model)."""

    def __init__(self, d_model: int, max_len: int = 4096) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[1]
        if offset + T > self.pe.shape[0]:
            raise ValueError(f"sequence of {offset + T} positions exceeds max_len {self.pe.shape[0]}")
        return x + self.pe[offset : offset + T].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """x + P[offset : offset + T] with P a trained (max_len, d_model) table."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        table = torch.randn(max_len, d_model)
        # on the meta device (checkpoint loaders build models there) there is nothing to scale, and the
        # meta multiply would run a reference op whose first use imports torch._dynamo (~1.5 s)
        self.weight = nn.Parameter(table if table.is_meta else table * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d) at positions offset … offset+T−1, or at explicit ``positions`` (T,) (a packed batch)."""
        T = x.shape[1]
        if positions is not None:
            if positions.numel() and int(positions.max()) >= self.weight.shape[0]:
                raise ValueError(f"position {int(positions.max())} exceeds max_len {self.weight.shape[0]}")
            return x + self.weight[positions].to(x.dtype)
        if offset + T > self.weight.shape[0]:
            raise ValueError(f"sequence of {offset + T} positions exceeds max_len {self.weight.shape[0]}")
        return x + self.weight[offset : offset + T].to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE in the half-split convention: x·cos(pos·θ) + rotate_half(x)·sin(pos·θ).

    ``inv_freq`` may be passed in precomputed (e.g. Llama-3 or YaRN frequency scaling); ``rotary_dim`` < head_dim
    rotates only the first dimensions (partial rotary). The long-context variants of RoPE add:

    - ``attention_factor``: cos and sin multiplied by it, which scales every q·k logit by its square (YaRN's
      mscale 0.1·ln s + 1, Peng et al. 2023, eq. 22; LongRoPE's √(1 + ln s / ln L), Ding et al. 2024) —
      as transformers' ``attention_scaling``.
    - ``long_inv_freq`` with ``long_after`` = L (LongRoPE, Ding et al. 2024; Phi-3's "su"/"longrope"): the
      frequencies of a sequence longer than L tokens (``inv_freq`` holds the short ones).
    - ``dynamic_ntk`` = (s, L) (dynamic NTK-aware scaling, bloc97/emozilla, as transformers'
      ``_compute_dynamic_ntk_parameters``): a sequence of n > L tokens uses the base
      b' = b·(s·n/L − (s − 1))^(d/(d−2)), so θ_i = b'^(−2i/d); ``base`` is b.

    Which length "the sequence" has: ``cos_sin(positions, seq_len=n)`` uses n for every position (the model's
    own forward passes n = its cache length + T, as transformers does with max(position_ids) + 1, so that its
    KV-cached decoding rotates each new token exactly as transformers' generate). Without ``seq_len`` (the
    inference engine's packed rows of many sequences) each position p is taken at length p + 1 — what
    transformers uses when it decodes that token — so a token's rotation never depends on which other
    sequences share its batch. A prompt longer than L prefilled by the engine therefore rotates its first L
    positions with the short frequencies where transformers' single forward uses the long ones for all.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None,
                 inv_freq: torch.Tensor | None = None, attention_factor: float = 1.0,
                 long_inv_freq: torch.Tensor | None = None, long_after: int | None = None,
                 dynamic_ntk: tuple[float, int] | None = None) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        if (long_inv_freq is None) != (long_after is None):
            raise ValueError("long_inv_freq and long_after go together (LongRoPE)")
        self.rotary_dim, self.base, self.attention_factor = rotary_dim, float(base), float(attention_factor)
        self.long_after, self.dynamic_ntk = long_after, dynamic_ntk
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # (rd/2,)
        self.long_inv_freq: torch.Tensor | None
        self.register_buffer("long_inv_freq", None if long_inv_freq is None else long_inv_freq.float(), persistent=False)

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the sequence's length (LongRoPE, dynamic NTK)."""
        return self.long_inv_freq is not None or self.dynamic_ntk is not None

    def _dynamic_inv_freq(self, n: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK frequencies at sequence lengths n (...,) → (..., rd/2), in float32 as transformers."""
        factor, max_len = self.dynamic_ntk  # type: ignore[misc]
        d = self.rotary_dim
        n = torch.clamp(n.to(torch.float32), min=float(max_len))
        base = self.base * (factor * n / max_len - (factor - 1)) ** (d / (d - 2))  # (...,)
        expo = torch.arange(0, d, 2, dtype=torch.int64, device=n.device).float() / d  # (rd/2,)
        return 1.0 / (base[..., None] ** expo)

    def freqs(self, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """The inverse frequencies of ``positions``: (rd/2,) for all, or (..., T, rd/2) one set per position."""
        if not self.length_dependent:
            return self.inv_freq
        if seq_len is not None:
            n = torch.tensor(seq_len, device=positions.device)
        else:
            n = positions + 1  # (..., T): each position at the length at which it is decoded
        if self.long_inv_freq is not None:
            long = (n > self.long_after)[..., None]  # LongRoPE: long factors once the sequence is past L
            return torch.where(long, self.long_inv_freq, self.inv_freq)
        return self._dynamic_inv_freq(n)

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) → cos, sin of shape (T, rd) or (B, 1, T, rd), broadcastable to q.

        ``seq_len``: the length of the sequence the positions belong to (see the class docstring); it only
        matters to the length-dependent variants.
        """
        angles = positions.to(torch.float32)[..., None] * self.freqs(positions, seq_len)  # (..., T, rd/2)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        partial = rd < x.shape[-1]
        x_rot = x[..., :rd] if partial else x
        xf = x_rot if x_rot.dtype == torch.float32 else x_rot.float()
        out = xf * cos + rotate_half(xf) * sin
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return torch.cat((out, x[..., rd:]), dim=-1) if partial else out

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, nh, T, hd), k: (B, n_kv, T, hd), positions: (T,) or (B, T)."""
        cos, sin = self.cos_sin(positions, seq_len)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def at(self, positions: torch.Tensor, seq_len: int | None = None) -> BoundRotary:
        """cos/sin of ``positions`` computed once, for every layer of one forward pass."""
        return BoundRotary(self, positions, *self.cos_sin(positions, seq_len))


class BoundRotary:
    """A :class:`RotaryEmbedding` with the angles of one set of positions precomputed."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.rotary, self.positions, self.cos, self.sin = rotary, positions, cos, sin

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is not self.positions:
            return self.rotary(q, k, positions)
        return self.rotary.rotate(q, self.cos, self.sin), self.rotary.rotate(k, self.cos, self.sin)

    def rotate_heads(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
        """x (B, T, heads, hd) with heads last-but-one — q and k heads side by side, rotated in one pass.
        None when the angles are per batch row ((B, T) positions): use ``__call__``. ``inplace`` (no gradient):
        x may be rotated in place and returned — in one pass of C over float32 rows where the kernels are built
        (kernels/rope.c: bit for bit the operations below)."""
        if self.cos.dim() != 2:
            return None
        if inplace and (lib := _rope_kernel(x, self.cos)) is not None:
            hd = x.shape[-1]
            cos, sin = self.cos.contiguous(), self.sin.contiguous()
            if lib.ak_rope_rows(x.data_ptr(), x.stride(1), x.shape[1], x.shape[2], hd, cos.shape[-1], cos.data_ptr(),
                                sin.data_ptr(), torch.get_num_threads()) == 0:
                return x
        return self.rotary.rotate(x, self.cos[:, None], self.sin[:, None])


def _rope_kernel(x: torch.Tensor, cos: torch.Tensor):
    """The C kernels for an in-place rotation of x (1, T, heads, hd) float32 on the CPU, each head's features
    contiguous and the heads one after another, with float32 angles (T, rd); else None."""
    if (x.dtype != torch.float32 or cos.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4
            or x.shape[0] != 1 or x.stride(-1) != 1 or x.stride(-2) != x.shape[-1] or x.requires_grad
            or cos.shape[0] != x.shape[1]):
        return None
    from ..kernels import library

    return library()


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes m_h from the ALiBi paper (§3 and its reference code).

    For n a power of two: m_h = 2^(−8h/n), h = 1…n. Otherwise the slopes of the closest smaller
    power of two, followed by every other slope of the next power of two.
    """
    def pow2_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = pow2_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(pow2_slopes(closest) + extra)


def alibi_bias(n_heads: int, q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi bias −m_h·|i − j| of shape (1, n_heads, q_len, k_len); queries are the last q_len positions."""
    k_len = q_len if k_len is None else k_len
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    dist = (i - j).abs().float()  # (T_q, T_k)
    return -alibi_slopes(n_heads).to(device)[None, :, None, None] * dist[None, None]


def t5_relative_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                       num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bucket index of relative_position = key_pos − query_pos (T5's scheme)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced buckets for max_exact ≤ n < max_distance; clamp(min=1) only avoids log(0) in unused lanes
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class T5RelativePositionBias(nn.Module):
    """Learned per-head scalar bias b_h(bucket(j − i)), returned as (1, n_heads, T_q, T_k)."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int | None = None) -> torch.Tensor:
        k_len = q_len if k_len is None else k_len
        device = self.embedding.weight.device
        i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        buckets = t5_relative_bucket(j - i, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (1, nh, T_q, T_k)
