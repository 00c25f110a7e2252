"""LSTM encoder–decoder with global attention: the recurrent baseline the Transformer replaced.

Luong, Pham & Manning 2015, "Effective Approaches to Attention-based Neural Machine Translation",
global attention with the "general" score:

    encoder:   m_1 … m_S = LSTM_enc(x_1 … x_S)                  (bidirectional by default)
    decoder:   h_t = LSTM_dec(y_{t-1}, h_{t-1})                   (state initialised from the encoder)
    score:     e_{t,s} = h_tᵀ · W_a · m_s                          (eq. 8, "general"); pads get −∞
    align:     a_t = softmax_s(e_t)                                (eq. 7)
    context:   c_t = Σ_s a_{t,s} · m_s
    output:    h̃_t = tanh(W_c · [c_t ; h_t])                       (eq. 5)
               p(y_t | y_<t, x) = softmax(W_s · h̃_t)              (eq. 6)

Input feeding (§3.3) is not used, so under teacher forcing the decoder LSTM runs over the whole
shifted target in one cuDNN/ATen call and the attention for all T positions is one batched matmul.
The recurrence itself is still sequential in T inside that call: h_t needs h_{t-1}. That is the
difference from the Transformer measured in ``benchmarks/parallelism.py``.

Width: ``d_model`` is the width of every hidden state (embeddings, encoder memory, decoder state),
"equal width" with a Transformer of the same ``d_model``. A bidirectional encoder uses
``d_model // 2`` units per direction so that its memory is ``d_model`` wide.

Padding: the source is right-padded with ``pad_id``; the encoder runs on packed sequences (pads are
never read) and attention gives pads −∞, so pad tokens cannot influence any output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .json_config import JsonConfig


@dataclass
class LSTMSeq2SeqConfig(JsonConfig):
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 256
    n_layers: int = 2
    dropout: float = 0.1
    bidirectional: bool = True  # encoder; d_model // 2 units per direction
    tie_output: bool = False  # output projection W_s = target embedding
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.bidirectional and self.d_model % 2 != 0:
            raise ValueError(f"a bidirectional encoder needs an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


class LuongAttention(nn.Module):
    """Global attention, "general" score h_tᵀ·W_a·m_s, then h̃_t = tanh(W_c·[c_t; h_t])."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.w_a = nn.Linear(d_model, d_model, bias=False)
        self.w_c = nn.Linear(2 * d_model, d_model, bias=False)
        self.last_weights: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, memory: torch.Tensor, src_keep: torch.Tensor,
                keys: torch.Tensor | None = None, need_weights: bool = False) -> torch.Tensor:
        """h: (B, T, d) decoder states; memory: (B, S, d); src_keep: (B, S) bool, True = real token.

        ``keys`` = W_a·memory may be passed in precomputed (it depends only on the source).
        Returns h̃: (B, T, d).
        """
        keys = self.w_a(memory) if keys is None else keys
        scores = h @ keys.transpose(1, 2)  # (B, T, S)
        scores = scores.masked_fill(~src_keep[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = weights.masked_fill(~src_keep.any(-1)[:, None, None], 0.0)  # an all-pad row: zeros, not NaN
        self.last_weights = weights if need_weights else None
        context = weights @ memory  # (B, T, d)
        return torch.tanh(self.w_c(torch.cat([context, h], dim=-1)))


class LSTMSeq2Seq(nn.Module):
    """Bidirectional-LSTM encoder, LSTM decoder, Luong global attention.

    ``forward(src, tgt_in)`` gives teacher-forced logits (B, T, V) like
    :class:`~attnkit.models.transformer.Seq2SeqTransformer`, so the same trainer can fit either.
    """

    def __init__(self, cfg: LSTMSeq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        enc_hidden = d // 2 if cfg.bidirectional else d
        drop = cfg.dropout if cfg.n_layers > 1 else 0.0
        self.src_embed = nn.Embedding(cfg.src_vocab_size, d, padding_idx=cfg.pad_id)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, d, padding_idx=cfg.pad_id)
        self.encoder = nn.LSTM(d, enc_hidden, num_layers=cfg.n_layers, batch_first=True, dropout=drop,
                               bidirectional=cfg.bidirectional)
        self.decoder = nn.LSTM(d, d, num_layers=cfg.n_layers, batch_first=True, dropout=drop)
        self.attention = LuongAttention(d)
        self.generator = nn.Linear(d, cfg.tgt_vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    # -- checks ----------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor, vocab_size: int, what: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{what} tokens must have shape (B, T), got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{what} tokens must be int64 token ids, got dtype {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"{what} token ids must lie in [0, {vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """src (B, S) right-padded ids → memory (B, S, d), src_keep (B, S) bool, decoder state (h0, c0).

        Pads are skipped by packing; memory at pad positions is zero (and masked in attention).
        """
        self._check_tokens(src, self.config.src_vocab_size, "source")
        cfg = self.config
        keep = src != cfg.pad_id
        lengths = keep.sum(dim=1)
        # right padding: every real token comes before every pad
        if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
            raise ValueError("source must be right-padded: a real token follows pad_id in some row")
        B, S = src.shape
        x = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)
        if cfg.bidirectional:  # (2L, B, d/2) → (L, B, d): [forward; backward] final states per layer
            h = h.view(cfg.n_layers, 2, B, -1).transpose(1, 2).reshape(cfg.n_layers, B, cfg.d_model)
            c = c.view(cfg.n_layers, 2, B, -1).transpose(1, 2).reshape(cfg.n_layers, B, cfg.d_model)
        return memory, keep, (h.contiguous(), c.contiguous())

    # -- decoder ---------------------------------------------------------------------------
    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_keep: torch.Tensor,
               state: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor | None = None,
               need_weights: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tgt_in (B, T) ids continuing from ``state`` → logits (B, T, V) and the new state.

        With T = the whole shifted target this is teacher forcing; with T = 1 one decoding step.
        """
        self._check_tokens(tgt_in, self.config.tgt_vocab_size, "target")
        x = self.dropout(self.tgt_embed(tgt_in))
        h, state = self.decoder(x, state)
        h_tilde = self.attention(h, memory, src_keep, keys=keys, need_weights=need_weights)
        return self.generator(self.dropout(h_tilde)), state

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, T_tgt, V) for every target position."""
        if isinstance(src, torch.Tensor) and isinstance(tgt_in, torch.Tensor) and src.dim() == 2 \
                and tgt_in.dim() == 2 and src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"batch sizes differ: source {src.shape[0]}, target {tgt_in.shape[0]}")
        memory, keep, state = self.encode(src)
        logits, _ = self.decode(tgt_in, memory, keep, state)
        return logits

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding, one token per step: ids (B, ≤max_len) without BOS.

        Each row ends with its EOS (if produced within ``max_len``) and is padded with pad_id after
        it; the loop stops as soon as every row has produced EOS.
        """
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        cfg = self.config
        memory, keep, state = self.encode(src)
        keys = self.attention.w_a(memory)  # W_a·m_s depends only on the source: computed once
        B = src.shape[0]
        tok = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            logits, state = self.decode(tok, memory, keep, state, keys=keys)
            nxt = logits[:, -1].argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
            out.append(nxt)
            done = done | (nxt == cfg.eos_id)
            if bool(done.all()):
                break
            tok = nxt[:, None]
        return torch.stack(out, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
