"""A1111 prompt syntax: emphasis weights, BREAK, and 75-token chunks.

``(text)`` multiplies the attention weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets it;
nesting multiplies; ``\\(`` and ``\\)`` are literal brackets; unclosed brackets apply to the end of the
prompt. Long prompts are cut into chunks of 75 tokens, each encoded on its own and concatenated;
a full chunk moves the text after its last comma to the next chunk when that comma is within the last
20 tokens; ``BREAK`` starts a new chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHUNK = 75
COMMA_BACKTRACK = 20
ROUND, SQUARE = 1.1, 1 / 1.1

_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\      # escapes and a lone backslash
    | \( | \[                                 # openers
    | :\s*([+-]?[.\d]+)\s*\)                  # explicit weight closing a round bracket
    | \) | \]                                 # closers
    | [^\\()\[\]:]+                           # plain text
    | :                                       # a colon that is just text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def extract_network_tags(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A1111's extra-network tags ``<kind:item:item...>`` (``<lora:name:0.8>``): the text without them,
    and (kind, items) for each, in order."""
    tags = [(m.group(1), m.group(2).split(":")) for m in _NETWORK_TAG.finditer(text)]
    return _NETWORK_TAG.sub("", text), tags


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; BREAK becomes ("BREAK", -1)."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[list] = []
    for run in runs:
        if run[0] == "" and run[1] != -1:
            continue
        if merged and merged[-1][1] == run[1] and run[1] != -1:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged] or [("", 1.0)]


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_prompt(text: str, encode, comma_id: int, syntax: str = "a1111") -> list[Chunk]:
    """Token chunks of at most 75 BPE ids with their weights (without start/end tokens).

    ``encode`` may return tuples among the ids: the token rows of a multi-vector textual-inversion
    embedding, kept together in one chunk (a new chunk starts when they do not fit, as A1111 does).
    ``syntax="plain"``: no weights, one chunk truncated to 75 (what diffusers does)."""
    if syntax == "plain":
        ids = [i for t in encode(text) for i in (t if isinstance(t, tuple) else (t,))][:CHUNK]
        return [Chunk(ids, [1.0] * len(ids))]
    if syntax != "a1111":
        raise ValueError(f"unknown prompt syntax {syntax!r}; use 'a1111' or 'plain'")
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in parse_attention(text):
        if weight == -1:
            close()
            continue
        for token in encode(piece):
            if isinstance(token, tuple):  # an embedding's rows
                if len(token) > CHUNK:
                    raise ValueError(f"an embedding of {len(token)} vectors does not fit in a {CHUNK}-token chunk")
                if len(chunk.tokens) + len(token) > CHUNK:
                    close()
                chunk.tokens.extend(token)
                chunk.weights.extend([weight] * len(token))
                continue
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's composable prompts: ``a cat :1.2 AND a dog :0.8`` -> [("a cat", 1.2), ("a dog", 0.8)];
    ``AND`` in capitals as a word; a part without ``:weight`` at its end weighs 1; trailing white space
    is dropped, as A1111 does."""
    parts = []
    for part in _AND.split(text):
        m = _PART_WEIGHT.match(part)
        body, weight = m.group(1), m.group(2)
        parts.append((body, float(weight) if weight is not None else 1.0))
    return parts
