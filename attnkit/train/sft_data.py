"""Supervised fine-tuning data for causal LMs: JSONL → token ids with a loss mask, packed or padded.

One JSON object per line, one of
    {"text": "..."}                                   plain text; loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
                                                      rendered by the model's chat template; loss on the
                                                      assistant turns only
Labels are the token ids where the loss applies and −100 elsewhere (PyTorch's ``ignore_index``).

Packing puts several examples in one row of at most ``seq_len`` tokens, so little compute is spent on
padding. With ``boundaries`` (what the trainer uses) each example is kept whole and carries a per-token
document id: the model masks attention block-diagonally (causal within each example, nothing across)
and restarts the positions at 0 per example, so a packed row computes exactly the losses of its examples
run one by one (as the "packing with position_ids" of Krell et al. 2021, "Efficient Sequence Packing
without Cross-contamination", §3). Without, the examples are concatenated and cut into rows of exactly
``seq_len`` whose tokens may attend across an example boundary (the "naive" packing).
"""

from __future__ import annotations

import bisect
import json
import random
from pathlib import Path
from typing import Any, Iterator

import torch

from ..text.chat_template import render_chat
from ..text.tokenizer import Tokenizer

IGNORE = -100
Example = tuple[list[int], list[int]]  # (input ids, labels)
PackedExample = tuple[list[int], list[int], list[int]]  # (input ids, labels, document id of each token)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ({"text"} <= set(row) or {"prompt", "completion"} <= set(row)
                                             or "messages" in row):
            raise ValueError(f'{path}:{i}: expected an object with "text", "prompt" + "completion", or "messages"')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def _segments(row: dict[str, Any], tok: Tokenizer, source: str) -> list[tuple[str, bool]]:
    """The example as (text, loss?) pieces in order."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError(f"{source}: messages must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{source}: no assistant message to learn from")
        kw = dict(source=source, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        out, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = render_chat(tok.chat_template, msgs[:i], add_generation_prompt=True, **kw)
            full = render_chat(tok.chat_template, msgs[:i + 1], add_generation_prompt=False, **kw)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(f"{source}: the chat template does not render turn by turn as prefixes; "
                                 "cannot mark the assistant tokens")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return out
    if "prompt" in row:
        return [(row["prompt"], False), (row["completion"], True)]
    return [(row["text"], True)]


def tokenize(row: dict[str, Any], tok: Tokenizer, max_len: int, source: str = "example") -> Example:
    """(ids, labels) of one row; plain text and prompt/completion rows get BOS as the tokenizer adds it
    and an EOS at the end; chat rows are exactly what the template renders."""
    chat = "messages" in row
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, loss) in enumerate(_segments(row, tok, source)):
        piece = tok.encode(text, add_special_tokens=not chat and k == 0)
        ids += piece
        labels += piece if loss else [IGNORE] * len(piece)
    if not chat and tok.eos_ids:
        eos = min(tok.eos_ids)
        ids.append(eos)
        labels.append(eos)
    return ids[:max_len], labels[:max_len]


def load_examples(path: str | Path, tok: Tokenizer, max_len: int) -> list[Example]:
    out = [tokenize(r, tok, max_len, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]
    if not any(l != IGNORE for _, labels in out for l in labels):
        raise ValueError(f"{path}: no token carries a loss (empty completions / assistant turns?)")
    return out


PACKING = ("bfd", "order")


def pack(examples: list[Example], seq_len: int, boundaries: bool = False,
         strategy: str = "order") -> list[Example] | list[PackedExample]:
    """``boundaries``: whole examples into rows of at most ``seq_len`` tokens, each token with its example's
    index in the row; the first token of each example gets no label (alone, nothing predicts it). ``strategy``
    "order" fills rows in the examples' order (a new row when the next one does not fit); "bfd" (best-fit
    decreasing, as TRL's ``packing_strategy="bfd"``) places the longest first, each into the fullest row it fits,
    so fewer rows carry padding (the docstrings of ``benchmarks/finetune_speed.py``: 83 % → 96 % of tokens real).
    Else: concatenate and cut into rows of exactly ``seq_len`` (the tail shorter than a row is dropped
    unless it is all there is)."""
    if strategy not in PACKING:
        raise ValueError(f"packing strategy must be one of {', '.join(PACKING)}, got {strategy!r}")
    if boundaries:
        where = _rows_of(examples, seq_len, strategy)
        rows: list[PackedExample] = [([], [], []) for _ in range(max(where, default=-1) + 1)]
        for r, (ids, labels) in zip(where, examples):  # within a row, the examples keep their order
            row_ids, row_labels, docs = rows[r]
            doc = docs[-1] + 1 if docs else 0
            row_ids += ids
            row_labels += [IGNORE, *labels[1:]][:len(labels)]
            docs += [doc] * len(ids)
        return rows
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    cut = [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    if len(cut) > 1 and len(cut[-1][0]) < seq_len:
        cut.pop()
    return cut


def _rows_of(examples: list[Example], seq_len: int, strategy: str) -> list[int]:
    """The row of each example under ``strategy`` (rows numbered as they open)."""
    row = [0] * len(examples)
    if strategy == "order":
        n, used = -1, seq_len + 1
        for i, (ids, _) in enumerate(examples):
            if used + len(ids) > seq_len:
                n, used = n + 1, 0
            row[i], used = n, used + len(ids)
        return row
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the first that fits is the fullest
    n = 0
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        size = len(examples[i][0])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            left, r = seq_len, n
            n += 1
        else:
            left, r = free.pop(at)
        row[i] = r
        if left - size > 0:
            bisect.insort(free, (left - size, r))
    return row


def collate(batch: list[Example] | list[PackedExample], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids and labels (B, T), and for packed rows their document ids (B, T) (−1 on padding);
    padding sits after every real token, so the causal mask keeps the real tokens from seeing it, and its
    labels are ignored."""
    T = max(len(row[0]) for row in batch)
    x = torch.full((len(batch), T), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    d = torch.full((len(batch), T), -1, dtype=torch.long)
    for i, row in enumerate(batch):
        x[i, :len(row[0])] = torch.tensor(row[0])
        y[i, :len(row[1])] = torch.tensor(row[1])
        if len(row) == 3:
            d[i, :len(row[2])] = torch.tensor(row[2])
    return (x, y, d) if all(len(row) == 3 for row in batch) else (x, y)


def micro_batches(rows: list[Example] | list[PackedExample], batch_size: int, pad_id: int, seed: int, start: int = 0,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled micro-batches, epoch after epoch (epoch e shuffled with seed + e), from the
    ``start``-th micro-batch on (resume). Data parallel: micro-batch k is global, ``batch_size × world`` rows in
    an order that does not depend on ``world``, and rank ``rank`` gets its ``rank``-th slice of ``batch_size``."""
    size = batch_size * world
    if world > 1 and len(rows) < size:
        raise ValueError(f"{len(rows)} training rows cannot fill a global micro-batch of {size} "
                         f"(batch_size {batch_size} × world size {world}); lower --batch-size or add data")
    per_epoch = max(1, len(rows) // size)
    k = start
    while True:
        epoch, i = divmod(k, per_epoch)
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        chunk = [rows[j] for j in order[i * size:(i + 1) * size]] or [rows[order[0]]]
        yield collate(chunk[rank * batch_size:(rank + 1) * batch_size], pad_id)
        k += 1
