"""A generated supervised fine-tuning task: product reviews → a label in a fixed JSON shape.

    user:      Classify the review. Reply with JSON only.
               Review: I bought a laptop last week and it is useless.
    assistant: {"sentiment": "negative", "topic": "electronics"}

Reviews are built from templates, nouns of four topics and adjectives of two sentiments. The
held-out split is a partition of the review texts by a stable hash (as in :mod:`attnkit.data.tasks`),
so no held-out review is ever trained on. A model that has not seen the task rarely answers in exactly
this shape with exactly these label words; held-out accuracy is an exact match of the parsed JSON.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

TOPICS = {
    "food": ["pasta", "soup", "pizza", "burger", "salad", "dessert", "coffee", "sandwich", "curry", "bread"],
    "electronics": ["laptop", "phone", "charger", "headphones", "camera", "monitor", "keyboard", "tablet", "speaker", "router"],
    "travel": ["hotel", "flight", "train ride", "room", "beach trip", "tour", "airport lounge", "cruise", "hostel", "rental car"],
    "clothing": ["jacket", "pair of shoes", "dress", "shirt", "pair of jeans", "scarf", "pair of boots", "sweater", "coat", "hat"],
}
ADJECTIVES = {
    "positive": ["excellent", "wonderful", "great", "amazing", "perfect", "lovely", "fantastic", "superb", "delightful", "brilliant"],
    "negative": ["terrible", "awful", "disappointing", "horrible", "useless", "bad", "dreadful", "poor", "annoying", "mediocre"],
}
TEMPLATES = [
    "The {n} was {a}.",
    "I bought a {n} last week and it is {a}.",
    "Honestly, the {n} turned out {a}.",
    "Our {n} was {a}, and the {n2} was {a2} too.",
    "What a {a} {n}!",
    "My friend recommended the {n}; it was {a}.",
    "Five words: the {n}, simply {a}.",
    "I would call the {n} {a}, and the {n2} {a2}.",
]
INSTRUCTION = "Classify the review. Reply with JSON only.\nReview: "
SYSTEM = "You label product reviews."  # short: SmolLM2's template would otherwise add a 20-token default


def sample(rng: random.Random) -> tuple[str, dict[str, str]]:
    topic = rng.choice(sorted(TOPICS))
    sentiment = rng.choice(sorted(ADJECTIVES))
    n, n2 = rng.sample(TOPICS[topic], 2)
    a, a2 = rng.sample(ADJECTIVES[sentiment], 2)
    return rng.choice(TEMPLATES).format(n=n, n2=n2, a=a, a2=a2), {"sentiment": sentiment, "topic": topic}


def is_heldout(review: str, percent: int = 20) -> bool:
    return zlib.crc32(review.encode()) % 100 < percent


def examples(split: str, n: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """``n`` distinct (review, label) pairs of the 'train' or 'test' split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng, out, seen = random.Random(f"reviews/{split}/{seed}"), [], set()
    for _ in range(200 * n):
        review, label = sample(rng)
        if review in seen or is_heldout(review) != (split == "test"):
            continue
        seen.add(review)
        out.append((review, label))
        if len(out) == n:
            return out
    raise ValueError(f"could not draw {n} distinct {split} reviews")


def answer(label: dict[str, str]) -> str:
    return json.dumps(label)


def chat_row(review: str, label: dict[str, str]) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTION + review},
                         {"role": "assistant", "content": answer(label)}]}


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prompt_messages(review: str) -> list[dict[str, str]]:
    return chat_row(review, {})["messages"][:2]


def score(generated: str, label: dict[str, str]) -> tuple[bool, bool]:
    """(valid JSON object, exactly the label)."""
    try:
        got = json.loads(generated.strip())
    except ValueError:
        return False, False
    return isinstance(got, dict), got == label
