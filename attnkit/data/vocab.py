"""A token ↔ id table and padded batches for the generated seq2seq tasks."""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

import torch

from .tasks import Example

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocab:
    """Ids 0-3 are <pad> <bos> <eos> <unk> (matching Seq2SeqConfig's pad/bos/eos defaults)."""

    def __init__(self, symbols: Iterable[str]) -> None:
        self.itos: list[str] = list(SPECIALS) + [s for s in dict.fromkeys(symbols) if s not in SPECIALS]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids → tokens, stopping at <eos> and dropping <pad>/<bos>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        itos = d.get("itos")
        if not isinstance(itos, list) or itos[: len(SPECIALS)] != list(SPECIALS):
            raise ValueError("vocab JSON must hold 'itos', a list starting with " + ", ".join(SPECIALS))
        return cls(itos[len(SPECIALS):])


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def make_batch(examples: Sequence[Example], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, tgt_in, tgt_out): src = x₁…xₘ <eos>, tgt_in = <bos> y₁…yₙ, tgt_out = y₁…yₙ <eos>.

    The source's <eos> marks where it ends, which position-based tasks (reverse) need.
    """
    src = pad_batch([vocab.encode(s) + [vocab.eos_id] for s, _ in examples], vocab.pad_id)
    tgt = [vocab.encode(t) for _, t in examples]
    tgt_in = pad_batch([[vocab.bos_id] + t for t in tgt], vocab.pad_id)
    tgt_out = pad_batch([t + [vocab.eos_id] for t in tgt], vocab.pad_id)
    return src, tgt_in, tgt_out


def batches(stream: Iterator[Example], vocab: Vocab, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches from an example stream."""
    while True:
        yield make_batch([next(stream) for _ in range(batch_size)], vocab)


def shuffled(examples: list[Example], seed: int) -> Iterator[Example]:
    """Cycle through a fixed example list, reshuffled every epoch."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield examples[i]
