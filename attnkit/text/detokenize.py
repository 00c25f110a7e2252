"""Incremental detokenisation for streaming: emit text as tokens arrive, never half a character.

A token may hold part of a UTF-8 character (byte-level BPE, SentencePiece byte fallback: "😀" is
four byte tokens), and decoders may change earlier text (SentencePiece strips the first token's
leading space). So each new token is decoded *together with* a few tokens before it: with
``prefix`` ≤ ``read`` ≤ len(ids),

    emitted so far ends at decode(ids[prefix:read]),   candidate = decode(ids[prefix:])

and the difference is emitted only when it grew and does not end in U+FFFD (an incomplete
character); then the window slides (prefix ← read, read ← len(ids)). The same scheme is used by
text-generation-inference and vLLM.
"""

from __future__ import annotations

from typing import Iterable

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``push(token_id) -> str`` returns the new complete text; ``flush()`` whatever is left at the end.

    ``context`` — a few tokens preceding the stream (the end of the prompt) — makes the first
    streamed token decode as it would mid-text (e.g. keep its leading space).
    """

    def __init__(self, tokenizer: Tokenizer, context: Iterable[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the very end stays U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
