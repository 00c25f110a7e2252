"""The tool-call parsers of attnkit/serve/tool_parsers.py on their own: each family's format whole, the same
text streamed in random chunkings, markers held back while they may still open a call, and text that never
becomes a call (malformed JSON, an unknown name) left as content, marker and all."""

from __future__ import annotations

import json
import random

import pytest

from attnkit.serve.tool_parsers import NamedParser, StreamParser, collect, parse
from attnkit.serve.tools import detect_format

NAMES = {"get_weather", "add"}
WEATHER = '{"city": "Pa\\"ris}", "days": [1, {"n": 2}]}'  # quotes, braces in a string, nesting

WELL_FORMED = [  # (format, text, content, [(name, arguments)])
    ("hermes", f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
               '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n',
     "Let me check.", [("get_weather", WEATHER), ("add", '{"a":1,"b":2}')]),
    ("hermes", '<tool_call>{"name": "add", "arguments": {}}</tool_call> Done.', "Done.", [("add", "{}")]),
    ("llama3", f' {{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "add", "parameters": {{"a": 1}}}}',
     None, [("get_weather", WEATHER), ("add", '{"a": 1}')]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 1}}', None, [("add", '{"a": 1}')]),
    ("mistral", f'Sure [TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
                '{"name": "add", "arguments": {"b": 2}}]', "Sure", [("get_weather", WEATHER), ("add", '{"b": 2}')]),
    ("mistral", '[{"name": "add", "arguments": {"a": 1}}]', None, [("add", '{"a": 1}')]),  # marker skipped
    ("json_array", f'[{{"name":"get_weather","parameters":{WEATHER}}},{{"name":"add","parameters":{{}}}}]',
     None, [("get_weather", WEATHER), ("add", "{}")]),
]

NOT_CALLS = [  # (format, text): all content, exactly as generated
    ("hermes", "Paris is sunny today.\n"),
    ("hermes", '<tool_call>{"name": "get_weather" "arguments": {}}</tool_call>'),  # a comma missing
    ("hermes", 'a <tool_call>not json</tool_call> b'),
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # not among the tools
    ("hermes", '<tool_call>{"arguments": {}, "name": "add"}</tool_call>'),  # name must come first
    ("hermes", "ends with a partial marker <tool_c"),
    ("llama3", 'The answer: {"name": "add", "parameters": {}}'),  # a call must open the output
    ("mistral", "[1, 2, 3] are numbers"),
    ("mistral", "no calls [TOOL_CALLS] here"),
]


def chunked(parser, text: str, rng: random.Random) -> list:
    events, i = [], 0
    while i < len(text):
        k = rng.randint(1, 7)
        events += parser.feed(text[i:i + k])
        i += k
    return events + parser.finish()


def as_pairs(calls):
    return [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("fmt,text,content,calls", WELL_FORMED)
def test_each_format_whole_and_in_random_chunks(fmt, text, content, calls):
    got_content, got_calls = parse(StreamParser(fmt, NAMES), text)
    assert (got_content or None, as_pairs(got_calls)) == (content, calls)
    for c in got_calls:
        json.loads(c["arguments"])  # the arguments are the object's text as generated: valid JSON here
    for seed in range(50):
        events = chunked(StreamParser(fmt, NAMES), text, random.Random(seed))
        assert collect(events) == (got_content, got_calls)
        starts = [e for e in events if e[0] == "call"]
        assert [e[1] for e in starts] == list(range(len(calls)))  # each call announced once, in order
        for e in events:  # argument fragments come after their call's announcement
            if e[0] == "args":
                assert events.index(starts[e[1]]) < events.index(e)


@pytest.mark.parametrize("fmt,text", NOT_CALLS)
def test_text_that_never_becomes_a_call_is_content(fmt, text):
    assert parse(StreamParser(fmt, NAMES), text) == (text, [])
    for seed in range(20):
        assert collect(chunked(StreamParser(fmt, NAMES), text, random.Random(seed))) == (text, [])


def test_a_possible_marker_is_held_back_until_decided():
    p = StreamParser("hermes", NAMES)
    assert p.feed("Hi <tool") == [("content", "Hi")]  # the space waits too: a call may follow it
    assert p.feed("_c") == []
    assert p.feed('all>{"name": "add", "argu') == []  # the head is not complete yet
    assert p.feed('ments": {"a"') == [("call", 0, "add"), ("args", 0, '{"a"')]
    assert p.feed(": 1}}</tool_call>") == [("args", 0, ": 1}")]
    p = StreamParser("hermes", NAMES)
    assert p.feed("x <tool_c") == [("content", "x")]
    assert p.feed("ar is a word") == [("content", " <tool_car is a word")]
    assert p.finish() == []


def test_truncated_arguments_stay_a_call():
    """finish_reason "length" can cut the arguments, as OpenAI's (the head was complete)."""
    assert as_pairs(parse(StreamParser("hermes", NAMES), '<tool_call>{"name": "add", "arguments": {"a": 1')[1]) \
        == [("add", '{"a": 1')]
    # but a head cut short is content
    assert parse(StreamParser("hermes", NAMES), '<tool_call>{"name": "ad') == ('<tool_call>{"name": "ad', [])


def test_named_parser_takes_the_whole_output_as_arguments():
    p = NamedParser("add")
    events = p.feed('{"a"') + p.feed(": 1}") + p.finish()
    assert collect(events) == ("", [{"name": "add", "arguments": '{"a": 1}'}])
    assert events[0] == ("call", 0, "add")


def test_format_detected_from_the_template():
    assert detect_format("{% if tools %}<tool_call>{{ tools }}{% endif %}") == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}{% if message.role == 'ipython' %}{% endif %}") == "llama3"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{{ messages }}") == detect_format(None) == "hermes"
    with pytest.raises(ValueError, match="format"):
        StreamParser("xml", NAMES)


PIECES = ['<tool_call>', '</tool_call>', '{"name": "add", "arguments": ', '{"name":"get_weather","parameters":', '{',
          '}', '"', '\\', ' ', '\n', ';', ',', '[', ']', 'x', '[TOOL_CALLS]', '<|python_tag|>', '<tool', '"a": 1']


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "json_array"])
def test_random_texts_parse_alike_in_any_chunking(fmt):
    """Well-formed calls mutated at random: the same content and calls whatever the chunking; without a call
    the content is the text."""
    rng = random.Random(fmt)
    bases = [t for f, t, _, _ in WELL_FORMED if f == fmt]
    for _ in range(300):
        text = rng.choice(bases)
        for _ in range(rng.randint(0, 3)):  # well-formed calls with pieces inserted or cut out
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            text = text[:i] + rng.choice(PIECES) + text[i:] if rng.random() < 0.6 else text[:i] + text[j:]
        whole = parse(StreamParser(fmt, NAMES), text)
        if not whole[1]:
            assert whole[0] == text
        for seed in range(3):
            assert collect(chunked(StreamParser(fmt, NAMES), text, random.Random(seed))) == whole, text
