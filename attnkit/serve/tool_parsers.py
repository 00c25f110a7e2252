"""Tool calls in generated text, parsed whole or as it streams, in the formats model families are trained on.

- ``hermes`` (Hermes 2 Pro, Qwen 2.5/3, and the fallback prompt of :mod:`attnkit.serve.tools`): any number of
  ``<tool_call>{"name": N, "arguments": {...}}</tool_call>`` blocks, with content around them;
- ``llama3`` (Llama 3.1+ JSON tool calling): an output that opens with ``{"name": N, "parameters": {...}}``
  (after ``<|python_tag|>`` when special tokens are shown), several calls separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": N, "arguments": {...}}, ...]`` after any content (or opening the
  output without its marker, a special token that is skipped in the text);
- ``json_array`` (what tool_choice "required" forces): the whole output is ``[{"name": N, "parameters": {...}}, ...]``.

A call is recognised once its head — ``{"name": "<one of the tools>", "arguments"|"parameters": {`` — is
complete (within 400 characters); from there its arguments are the object's text exactly as generated,
streamed as it comes (``finish_reason`` "length" can cut them short, as OpenAI's). Text that does not
become a head — malformed JSON, an unknown name, other keys first — is content, its marker included.
Whitespace next to a call is dropped. Every decision depends only on the text so far, so each chunking
of a text yields the same content and calls; parsing a whole text is the one-chunk case.

Events: ``("content", text)``, ``("call", index, name)``, ``("args", index, text)``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

FORMATS = ("hermes", "llama3", "mistral", "json_array")
_START = {"hermes": ("<tool_call>",), "llama3": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]",), "json_array": ()}
_END = "</tool_call>"
_HEAD_LIMIT = 400
_WS = " \t\r\n"
MORE = "more"  # a head that the next text may complete

Event = tuple


def _head(buf: str) -> tuple[str, int] | str | None:
    """``buf`` opens with a call head: (the name, where its arguments object starts); MORE; None: it cannot."""
    i = 0
    for step in ("{", '"name"', ":", "NAME", ",", "KEY", ":"):
        while i < len(buf) and buf[i] in _WS:
            i += 1
        if i == len(buf):
            return MORE
        if step == "NAME":
            if buf[i] != '"':
                return None
            j = i + 1
            while j < len(buf) and buf[j] != '"':
                j += 2 if buf[j] == "\\" else 1
            if j >= len(buf):
                return MORE
            try:
                name = json.loads(buf[i:j + 1])
            except ValueError:
                return None
            i = j + 1
            continue
        options = ('"arguments"', '"parameters"') if step == "KEY" else (step,)
        hit = next((o for o in options if buf.startswith(o, i)), None)
        if hit is None:
            return MORE if any(o.startswith(buf[i:]) for o in options) else None
        i += len(hit)
    while i < len(buf) and buf[i] in _WS:
        i += 1
    if i == len(buf):
        return MORE
    return (name, i) if buf[i] == "{" else None


class StreamParser:
    """Incremental parser of one choice's text in format ``fmt``; ``names``: the functions it may call."""

    def __init__(self, fmt: str, names: Collection[str]) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r} (known: {', '.join(FORMATS)})")
        self.fmt, self.names = fmt, set(names)
        self.buf = ""  # text not decided yet
        self.pending = ""  # the open region's text before its first call: content if no call comes
        self.state = {"llama3": "start", "mistral": "start", "json_array": "region"}.get(fmt, "text")
        self.calls = 0
        self.depth, self.in_str, self.esc = 0, False, False
        self.events: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """The events of what was held back, at the end of the output."""
        return self._run(final=True)

    # -- the machine ---------------------------------------------------------------------------
    def _run(self, final: bool) -> list[Event]:
        self.events = []
        while getattr(self, "_" + self.state)(final):
            pass
        merged: list[Event] = []
        for e in self.events:  # neighbouring content or argument fragments of one call become one event
            if merged and e[0] == merged[-1][0] and e[0] != "call" and e[1:-1] == merged[-1][1:-1]:
                merged[-1] = (*merged[-1][:-1], merged[-1][-1] + e[-1])
            else:
                merged.append(e)
        return merged

    def _content(self, text: str) -> None:
        if text:
            self.events.append(("content", text))

    def _fail(self) -> bool:
        """The open region holds no call after all: its text is content; read on from its end."""
        self._content(self.pending)
        self.pending, self.state = "", "text"
        return True

    def _text(self, final: bool) -> bool:
        hits = [(self.buf.find(m), m) for m in _START[self.fmt] if m in self.buf]
        if hits:
            i, m = min(hits)
            before = self.buf[:i].rstrip(_WS)
            self._content(before)
            self.pending = self.buf[len(before):i + len(m)]
            self.buf = self.buf[i + len(m):]
            self.state = "region" if self.fmt == "mistral" else "head"
            return True
        if final:
            self._content(self.buf.rstrip(_WS) if self.calls else self.buf)
            self.buf = ""
            return False
        keep = max((k for m in _START[self.fmt] for k in range(1, len(m)) if self.buf.endswith(m[:k])), default=0)
        emit = self.buf[:len(self.buf) - keep].rstrip(_WS)  # whitespace waits: a call may follow it
        self._content(emit)
        self.buf = self.buf[len(emit):]
        return False

    def _skip_ws(self) -> bool:
        """Move leading whitespace to ``pending``; False when nothing else is there yet."""
        rest = self.buf.lstrip(_WS)
        self.pending += self.buf[:len(self.buf) - len(rest)]
        self.buf = rest
        return bool(rest)

    def _start(self, final: bool) -> bool:  # llama3 "{", mistral "[" (its marker skipped as special) open calls
        if not self._skip_ws():
            return self._fail() if final else False
        opener = "{" if self.fmt == "llama3" else "["
        self.state = ("head" if opener == "{" else "region") if self.buf[0] == opener else "text"
        if self.state == "text":
            self.buf, self.pending = self.pending + self.buf, ""
        return True

    def _region(self, final: bool) -> bool:  # mistral / json_array: "[" opens the list of calls
        if not self._skip_ws():
            return self._fail() if final else False
        if self.buf[0] != "[":
            return self._fail()
        self.pending += "["
        self.buf, self.state = self.buf[1:], "head"
        return True

    def _head(self, final: bool) -> bool:
        found = _head(self.buf[:_HEAD_LIMIT])
        if found == MORE and len(self.buf) >= _HEAD_LIMIT:
            found = None
        if found == MORE:
            return self._fail() if final else False
        if found is None or found[0] not in self.names:
            return self._fail()
        name, end = found
        self.events.append(("call", self.calls, name))
        self.calls += 1
        self.pending, self.buf = "", self.buf[end:]
        self.state, self.depth, self.in_str, self.esc = "args", 0, False, False
        return True

    def _scan(self, stop_at: int) -> int | None:
        """Where the JSON value being scanned closes to depth ``stop_at`` (the index after it), or None."""
        for i, ch in enumerate(self.buf):
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == stop_at:
                    return i + 1
            elif ch == "<" and self.fmt == "hermes" and self.state == "tail":
                return i  # "</tool_call>" without the object's closing brace
        return None

    def _args(self, final: bool) -> bool:
        end = self._scan(0)
        n = len(self.buf) if end is None else end
        if n:
            self.events.append(("args", self.calls - 1, self.buf[:n]))
        self.buf = self.buf[n:]
        if end is None:
            return False
        self.state, self.depth = "tail", 1
        return True

    def _tail(self, final: bool) -> bool:  # the rest of the call object after its arguments: dropped
        end = self._scan(0)
        if end is None:
            self.buf = ""
            return False
        self.buf, self.state = self.buf[end:], "after"
        return True

    def _after(self, final: bool) -> bool:  # between calls
        self.buf = self.buf.lstrip(_WS)
        if not self.buf:
            return False
        if self.fmt == "hermes":
            if self.buf.startswith(_END):
                self.buf, self.state = self.buf[len(_END):], "gap"
                return True
            if _END.startswith(self.buf) and not final:
                return False
            self.state = "text"
            return True
        sep = ";" if self.fmt == "llama3" else ","
        if self.buf[0] == sep:
            self.pending, self.buf, self.state = sep, self.buf[1:], "head"
        else:
            if self.buf[0] == "]" and self.fmt != "llama3":
                self.buf = self.buf[1:]
            self.state = "text"
        return True


    def _gap(self, final: bool) -> bool:  # whitespace after a call's end marker: dropped
        self.buf = self.buf.lstrip(_WS)
        if self.buf:
            self.state = "text"
        return bool(self.buf)


class NamedParser:
    """tool_choice naming a function: the whole output is that function's arguments object."""

    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = [] if self.started else [("call", 0, self.name)]
        self.started = True
        return events + ([("args", 0, text)] if text else [])

    def finish(self) -> list[Event]:
        return [] if self.started else [("call", 0, self.name)]


def collect(events: list[Event]) -> tuple[str, list[dict[str, Any]]]:
    """The content and the calls (``{"name", "arguments"}``) that ``events`` spell."""
    content, calls = "", []
    for e in events:
        if e[0] == "content":
            content += e[1]
        elif e[0] == "call":
            calls.append({"name": e[2], "arguments": ""})
        else:
            calls[e[1]]["arguments"] += e[2]
    return content, calls


def parse(parser: StreamParser | NamedParser, text: str) -> tuple[str, list[dict[str, Any]]]:
    """A finished text's content and calls (``parser`` must be fresh)."""
    return collect(parser.feed(text) + parser.finish())
