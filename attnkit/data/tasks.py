"""Generated sequence-to-sequence tasks, deterministic from a seed.

- ``copy``, ``reverse``, ``sort``: strings over a 20-letter alphabet.
- ``dates``: ISO dates "1987-03-14" (characters) → "14th of March 1987" (words and digits): the
  decoder must find the day at the end of the source, the month in the middle and the year at the
  start, so it needs real alignment and reordering, and a small vocabulary of words.
- ``numbers``: digits "40213" → English words "forty thousand two hundred thirteen".

Train and held-out splits partition the *input space* by a stable hash of the source string, so no
held-out source is ever seen in training, however many training examples are drawn.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

Example = tuple[list[str], list[str]]

LETTERS = list("abcdefghijklmnopqrst")
DIGITS = list("0123456789")


@dataclass(frozen=True)
class Seq2SeqTask:
    name: str
    description: str
    sample: Callable[[random.Random], Example]
    symbols: tuple[str, ...]  # every token that can appear in a source or target
    max_src_len: int
    max_tgt_len: int

    def is_heldout(self, src: list[str], heldout_percent: int = 10) -> bool:
        return zlib.crc32(" ".join(src).encode()) % 100 < heldout_percent

    def examples(self, split: str, seed: int, heldout_percent: int = 10) -> Iterator[Example]:
        """An endless deterministic stream of examples from one split ('train' or 'test')."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        want_heldout = split == "test"
        while True:
            src, tgt = self.sample(rng)
            if self.is_heldout(src, heldout_percent) == want_heldout:
                yield src, tgt

    def take(self, split: str, n: int, seed: int, unique: bool = True) -> list[Example]:
        """``n`` examples of a split (distinct sources when ``unique``)."""
        out: list[Example] = []
        seen: set[str] = set()
        for src, tgt in self.examples(split, seed):
            key = " ".join(src)
            if unique and key in seen:
                continue
            seen.add(key)
            out.append((src, tgt))
            if len(out) == n:
                return out
        raise AssertionError("unreachable")


def _letters(rng: random.Random, min_len: int, max_len: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]


def _copy(rng: random.Random) -> Example:
    s = _letters(rng, 3, 16)
    return s, list(s)


def _reverse(rng: random.Random) -> Example:
    s = _letters(rng, 3, 16)
    return s, s[::-1]


def _sort(rng: random.Random) -> Example:
    s = _letters(rng, 3, 16)
    return s, sorted(s)


MONTHS = [calendar.month_name[m] for m in range(1, 13)]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


DATE_START, DATE_DAYS = dt.date(1900, 1, 1), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days + 1


def _dates(rng: random.Random) -> Example:
    d = DATE_START + dt.timedelta(days=rng.randrange(DATE_DAYS))
    return list(d.isoformat()), [ordinal(d.day), "of", MONTHS[d.month - 1], *str(d.year)]


ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> list[str]:
    """English words for 0 ≤ n < 10⁶, without "and" or hyphens: 40213 → forty thousand two hundred thirteen."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words supports 0 ≤ n < 1,000,000, got {n}")

    def below_thousand(k: int) -> list[str]:
        words: list[str] = []
        if k >= 100:
            words += [ONES[k // 100], "hundred"]
            k %= 100
        if k >= 20:
            words.append(TENS[k // 10])
            k %= 10
            if k:
                words.append(ONES[k])
        elif k:
            words.append(ONES[k])
        return words

    if n == 0:
        return ["zero"]
    thousands, rest = divmod(n, 1000)
    return (below_thousand(thousands) + ["thousand"] if thousands else []) + below_thousand(rest)


def _numbers(rng: random.Random) -> Example:
    n = rng.randrange(10 ** rng.randint(1, 6))  # spread over 1 to 6 digits
    return list(str(n)), number_words(n)


TASKS: dict[str, Seq2SeqTask] = {
    t.name: t
    for t in (
        Seq2SeqTask("copy", "copy a string of 3-16 letters", _copy, tuple(LETTERS), 16, 16),
        Seq2SeqTask("reverse", "reverse a string of 3-16 letters", _reverse, tuple(LETTERS), 16, 16),
        Seq2SeqTask("sort", "sort the letters of a string of 3-16 letters", _sort, tuple(LETTERS), 16, 16),
        Seq2SeqTask(
            "dates", "ISO date → '14th of March 1987'", _dates,
            tuple(DIGITS + ["-", "of"] + MONTHS + [ordinal(d) for d in range(1, 32)]), 10, 7,
        ),
        Seq2SeqTask(
            "numbers", "digits → English words (0-999999)", _numbers,
            tuple(dict.fromkeys(DIGITS + ONES + TENS[2:] + ["hundred", "thousand"])), 6, 14,
        ),
    )
}


def get_task(name: str) -> Seq2SeqTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}") from None
