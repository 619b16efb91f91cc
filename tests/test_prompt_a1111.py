"""The emphasis parser and the chunker against A1111's documented rules (modules/prompt_parser.py
parse_prompt_attention, modules/sd_hijack_clip.py tokenize_line), and their time at the prompt limits.

``_reference_attention`` restates A1111's parse in its plain form (every token a run, BREAK split by its
``re_break`` pattern, ranges multiplied at each closing bracket, equal neighbours merged at the end): the
expected values, whatever latentforge's faster parse does.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentforge.conditioning.prompt import (
    MAX_NESTING,
    MAX_PROMPT_CHARS,
    PromptError,
    chunk_prompt,
    parse_attention,
    split_break,
)
from latentforge.pipelines import GenerationRequest

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
LIMIT_SECONDS = 2.0  # the documented bound is about 0.2 s; ten times that on a shared, slow machine

# A1111's re_attention and re_break
_A1111_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _reference_attention(text: str) -> list[tuple[str, float]]:
    out: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def times(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _A1111_TOKEN.finditer(text):
        token, number = m.group(0), m.group(1)
        if token[0] == "\\":  # an escape keeps the character after the backslash; a lone one keeps nothing
            out.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(out))
        elif number is not None and opened["("]:
            times(opened["("].pop(), float(number))
        elif token == ")" and opened["("]:
            times(opened["("].pop(), 1.1)
        elif token == "]" and opened["["]:
            times(opened["["].pop(), 1 / 1.1)
        else:
            pieces = _A1111_BREAK.split(token)
            out.append([pieces[0], 1.0])
            for piece in pieces[1:]:
                out += [["BREAK", -1], [piece, 1.0]]
    for start in opened["("]:
        times(start, 1.1)
    for start in opened["["]:
        times(start, 1 / 1.1)
    merged: list[list] = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return [(t, w) for t, w in merged]


PIECES = [*"()[]:\\ ,ab\t", "\\\\", "BREAK", " BREAK ", "1.5", "-1", ":-1)", "0", ".", "\u00a0", "_", "\u2028"]


@settings(FUZZ)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_runs_and_weights_are_a1111s(text):
    try:
        got = parse_attention(text)
    except PromptError:
        return  # over a limit (nesting, weights): refused, where A1111 would go on
    assert got == _reference_attention(text)


@settings(FUZZ)
@given(
    st.lists(st.sampled_from([" ", "\t", "\n", "\u00a0", "\x1c", "\u3000", "B", "BREAK", "REAK", "x", "_", "é", "1"]))
)
def test_break_split_is_a1111s_pattern(pieces):
    text = "".join(pieces)
    assert split_break(text) == _A1111_BREAK.split(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("a\\\\b", [("a\\b", 1.0)]),  # an escaped one is one backslash
        ("\\", [("", 1.0)]),
        ("(a)\\ (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
        ("(red:-1) ball", [("red", -1.0), (" ball", 1.0)]),
        ("(BREAK:-1)", [("", -1.0), ("BREAK", 1.0), ("", -1.0)]),  # the marker is multiplied too
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        # A1111's own example (parse_prompt_attention's doctest)
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.1 * 1.1 * 1.3),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_examples(text, expected):
    assert [(t, pytest.approx(w)) for t, w in parse_attention(text)] == expected


def test_only_the_word_break_at_weight_minus_one_starts_a_chunk(tok):
    comma = tok.encode(",")[0]
    red, ball = tok.encode("red"), tok.encode(" ball")
    chunks = chunk_prompt("(red:-1) ball", tok.encode, comma)
    assert [c.tokens for c in chunks] == [red + ball]
    assert chunks[0].weights == [-1.0] * len(red) + [1.0] * len(ball)
    # -1.1 / 1.1 is -1 in floating point: still the word x at that weight
    chunks = chunk_prompt("[(x:-1.1)]", tok.encode, comma)
    assert [c.tokens for c in chunks] == [tok.encode("x")]
    assert chunks[0].weights == [pytest.approx(-1.0)]
    assert [c.tokens for c in chunk_prompt("a BREAK b", tok.encode, comma)] == [tok.encode("a"), tok.encode("b")]


COMMA, WORD, EMB = 0, 1, (900, 901)


def _encode(text: str) -> list:
    """One token per word, 0 for ",", and a 2-vector embedding for "E"."""
    out: list = []
    for word in text.replace(",", " , ").split():
        out.append(COMMA if word == "," else EMB if word == "E" else WORD)
    return out


def test_comma_backtrack_is_checked_before_an_embedding_as_in_a1111():
    # 60 words, a comma, 14 words (a full chunk, the comma 15 from its end), then the embedding: A1111
    # moves the 14 words after the comma to the next chunk before placing the embedding there
    chunks = chunk_prompt("w " * 60 + ", " + "w " * 14 + "E", _encode, COMMA)
    assert [len(c.tokens) for c in chunks] == [61, 16]
    assert chunks[0].tokens[-1] == COMMA and chunks[1].tokens == [WORD] * 14 + list(EMB)
    # 74 tokens: not full, so no backtrack; the embedding does not fit and starts the next chunk
    chunks = chunk_prompt("w " * 60 + ", " + "w " * 13 + "E", _encode, COMMA)
    assert [len(c.tokens) for c in chunks] == [74, 2]
    # the comma too far back (more than 20 tokens): the full chunk is kept
    chunks = chunk_prompt("w " * 40 + ", " + "w " * 34 + "E", _encode, COMMA)
    assert [len(c.tokens) for c in chunks] == [75, 2]


ADVERSARIAL = {
    "a run of spaces": "a" + " " * (MAX_PROMPT_CHARS - 10) + "b",
    "spaces around BREAK": " " * 9990 + "BREAK" + " " * 9990,
    "many BREAKs": "BREAK " * (MAX_PROMPT_CHARS // 6),
    "text deep in brackets": "[" * MAX_NESTING + "a:" * ((MAX_PROMPT_CHARS - MAX_NESTING) // 2),
    "many brackets": ("(" * MAX_NESTING + "x" + ")" * MAX_NESTING) * (MAX_PROMPT_CHARS // (2 * MAX_NESTING + 1)),
    "lone backslashes": "\\a" * (MAX_PROMPT_CHARS // 2),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_parsing_is_fast_at_the_limits(name):
    text = ADVERSARIAL[name]
    assert len(text) <= MAX_PROMPT_CHARS
    start = time.perf_counter()
    parse_attention(text)
    assert time.perf_counter() - start < LIMIT_SECONDS


def test_request_with_long_blank_prompts_validates_quickly():
    text = "a" + " " * (MAX_PROMPT_CHARS - 10) + "b"
    start = time.perf_counter()
    GenerationRequest(prompt=text, negative_prompt=text).validate()
    assert time.perf_counter() - start < LIMIT_SECONDS
