"""A plain-English text corpus that needs no download: the docstrings of Python's standard library.

Paragraphs of prose (not code, not tables) from module, class and function docstrings, split into
train and held-out sets by a stable hash of the paragraph — for distillation and perplexity runs.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from pathlib import Path


def _paragraphs(doc: str) -> list[str]:
    out = []
    for para in doc.split("\n\n"):
        text = " ".join(line.strip() for line in para.strip().splitlines())
        letters = sum(c.isalpha() or c == " " for c in text)
        if len(text) >= 200 and letters / len(text) > 0.9 and not text.startswith((">>>", "..", ":")):
            out.append(text)
    return out


def docstring_paragraphs(split: str, n: int, heldout_percent: int = 10) -> list[str]:
    """``n`` paragraphs of the 'train' or 'test' split (sorted by file, deterministic)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    seen: set[str] = set()
    for f in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        for node in nodes:
            for para in _paragraphs(ast.get_docstring(node) or ""):
                held = zlib.crc32(para.encode()) % 100 < heldout_percent
                if para not in seen and held == (split == "test"):
                    seen.add(para)
                    out.append(para)
                    if len(out) == n:
                        return out
    if not out:
        raise ValueError(f"no docstring paragraphs found under {root}")
    return out
