"""A1111 prompt syntax: emphasis weights, BREAK, and 75-token chunks.

``(text)`` multiplies the attention weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets it;
nesting multiplies; ``\\(`` and ``\\)`` are literal brackets (``\\\\`` a backslash; a backslash before
any other character is dropped, as by A1111); unclosed brackets apply to the end of the prompt. Long
prompts are cut into chunks of 75 tokens, each encoded on its own and concatenated; a full chunk moves
the text after its last comma to the next chunk when that comma is within the last 20 tokens (checked
before a textual-inversion embedding too, as A1111 does); ``BREAK`` starts a new chunk.

Prompts come from users and from image files, so the parsers check limits before any work
(``check_prompt``): length in characters, bracket nesting depth, and later the number of chunks and
the emphasis weights. A prompt over a limit raises ``PromptError`` naming the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHUNK = 75
COMMA_BACKTRACK = 20
ROUND, SQUARE = 1.1, 1 / 1.1

# Limits on untrusted prompts (far above what any real prompt uses)
MAX_PROMPT_CHARS = 20_000
MAX_NESTING = 50  # brackets ( [ open at once
MAX_CHUNKS = 40  # 75-token chunks: 3000 tokens
MAX_WEIGHT = 100.0  # |explicit emphasis weight|, as in (word:1.5)
MAX_EFFECTIVE_WEIGHT = 10_000.0  # |weight| after nesting multiplies


class PromptError(ValueError):
    """A prompt over a limit or with an unusable value; the message names the limit and the fix."""


def nesting_depth(text: str) -> int:
    """The most brackets ``(`` and ``[`` open at once (a backslash escapes the next character; a closer
    with nothing open is text). Both prompt parsers recurse at most this deep."""
    depth = deepest = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]" and depth:
            depth -= 1
    return deepest


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_prompt(text: str, what: str = "prompt") -> None:
    """Refuse a prompt the parsers should not run on: not a string, over ``MAX_PROMPT_CHARS`` characters
    or nested deeper than ``MAX_NESTING`` brackets. Cheap (one pass); called before any parsing."""
    if not isinstance(text, str):
        raise PromptError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"{what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS} (shorten it)")
    bad = _SURROGATE.search(text)
    if bad is not None:  # bytes that were not UTF-8 (argv, surrogateescape): no encoder or file can take them
        raise PromptError(
            f"{what} is not valid text: character {bad.start()} ({bad.group(0)!a}) comes from bytes that are "
            "not UTF-8; write the prompt in UTF-8"
        )
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise PromptError(
            f"{what} nests {depth} brackets ( or [ deep; the limit is {MAX_NESTING} "
            "(remove brackets, or escape literal ones as \\( \\[)"
        )


_TOKENS = re.compile(  # A1111's re_attention; group 1 the whole token (for findall), group 2 a weight
    r"""(
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\      # escapes, and a lone backslash (dropped, as by A1111)
    | \( | \[                                 # openers
    | :\s*([+-]?[.\d]+)\s*\)                  # explicit weight closing a round bracket
    | \) | \]                                 # closers
    | [^\\()\[\]:]+                           # plain text
    | :                                       # a colon that is just text
    )""",
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")
_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def extract_network_tags(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A1111's extra-network tags ``<kind:item:item...>`` (``<lora:name:0.8>``): the text without them,
    and (kind, items) for each, in order. Linear in the text's length: no tag ends after the last ``>``, so
    the pattern only sees the text up to it (from each ``<`` past it, ``[^>]+`` would scan to the end: 27 s
    for 100,000 characters of ``<a:``)."""
    end = text.rfind(">") + 1
    head = text[:end]
    tags = [(m.group(1), m.group(2).split(":")) for m in _NETWORK_TAG.finditer(head)]
    return _NETWORK_TAG.sub("", head) + text[end:], tags


def split_break(text: str) -> list[str]:
    r"""``re.split(r"\s*\bBREAK\b\s*", text)`` (A1111's ``re_break``) in linear time: that pattern retries
    its leading ``\s*`` at every blank of a long run of blanks (13 s for 20,000 spaces). Each ``BREAK``
    found as a word takes the blanks before it (back to the previous split) and after it."""
    parts: list[str] = []
    start = 0
    for m in _BREAK_WORD.finditer(text):
        parts.append(text[start : m.start()].rstrip())  # rstrip() drops what \s matches (str.isspace)
        start = _SPACES.match(text, m.end()).end()
    parts.append(text[start:])
    return parts


def parse_attention(text: str) -> list[tuple[str, float]]:
    r"""Split a prompt into (text, weight) runs, as A1111's ``parse_prompt_attention``: BREAK becomes
    ("BREAK", -1), and brackets around it multiply that -1 too (so there it is the word BREAK, as in
    A1111); neighbouring runs of equal weight merge, empty ones included; a backslash that escapes none
    of ``( ) [ ] \`` is dropped (``a\b`` is ``ab``).

    Explicit weights must be finite numbers within +-``MAX_WEIGHT`` (``PromptError`` otherwise)."""
    check_prompt(text)
    # [parts, weight]; text that follows text with no bracket or BREAK between joins its run: A1111 makes
    # a run of each and merges them at the end, as the same brackets scale them (so 18,000 ":" and "a"
    # inside 50 brackets are one run to scale, not 18,000)
    runs: list[list] = []
    joinable = False  # the last run takes more text
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(runs)):
            runs[i][1] *= factor

    for tok, weight in _TOKENS.findall(text):  # weight: "" unless tok is ":1.5)"
        if tok == "(":
            round_open.append(len(runs))
            joinable = False
            continue
        if tok == "[":
            square_open.append(len(runs))
            joinable = False
            continue
        if round_open and (weight or tok == ")"):
            scale(round_open.pop(), _weight(weight, text) if weight else ROUND)
            joinable = False
            continue
        if tok == "]" and square_open:
            scale(square_open.pop(), SQUARE)
            joinable = False
            continue
        if tok[0] == "\\":
            pieces = [tok[1:]]  # a lone backslash: ""
        elif "BREAK" in tok:
            pieces = split_break(tok)
        else:
            pieces = [tok]
        for i, piece in enumerate(pieces):
            if i:
                runs.append([["BREAK"], -1.0])
                joinable = False
            if joinable:
                runs[-1][0].append(piece)
            else:
                runs.append([[piece], 1.0])
                joinable = True
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    for parts, weight in runs:
        if not abs(weight) <= MAX_EFFECTIVE_WEIGHT:
            raise PromptError(
                f"emphasis of {''.join(parts)[:40]!r} multiplies to {weight:g}; nested weights may reach at most "
                f"{MAX_EFFECTIVE_WEIGHT:g} (use fewer or smaller weights)"
            )
    merged: list[list] = []  # A1111 merges equal neighbours, empty runs included
    for parts, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0].extend(parts)
        else:
            merged.append([parts, weight])
    return [("".join(parts), weight) for parts, weight in merged] or [("", 1.0)]


def is_break(piece: str, weight: float) -> bool:
    """Whether a run of ``parse_attention`` starts a new chunk: A1111's test, the text BREAK at weight -1
    (not any run at weight -1, such as ``(red:-1)``)."""
    return piece == "BREAK" and weight == -1


def _short(number: str) -> str:
    return number if len(number) <= 24 else number[:20] + "..."


def _weight(number: str, text: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise PromptError(f"emphasis weight {_short(number)!r} is not a number; write e.g. (word:1.2)") from None
    if not abs(value) <= MAX_WEIGHT:
        raise PromptError(f"emphasis weight {_short(number)} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return value


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
        check_prompt(text)
        ids = [i for t in encode(text) for i in (t if isinstance(t, tuple) else (t,))][:CHUNK]
        return [Chunk(ids, [1.0] * len(ids))]
    if syntax != "a1111":
        raise ValueError(f"unknown prompt syntax {syntax!r}; use 'a1111' or 'plain'")
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        if len(chunks) >= MAX_CHUNKS:
            raise PromptError(
                f"prompt is longer than {MAX_CHUNKS} chunks of {CHUNK} tokens ({MAX_CHUNKS * CHUNK} tokens, "
                "BREAK starting a chunk); shorten it"
            )
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in parse_attention(text):
        if is_break(piece, weight):
            close()
            continue
        for token in encode(piece):
            rows = token if isinstance(token, tuple) else None  # an embedding's rows
            if rows is not None and len(rows) > CHUNK:
                raise PromptError(
                    f"the prompt names an embedding of {len(rows)} vectors, which does not fit in a {CHUNK}-token "
                    "chunk (A1111 cannot use it either); use an embedding of at most 75 vectors"
                )
            # A1111's order (sd_hijack_clip.tokenize_line), embeddings included: note a comma; else move
            # the text after a comma within the last 20 tokens of a full chunk to the next; then close a
            # full chunk
            if rows is None and token == comma_id:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            if rows is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                continue
            if len(chunk.tokens) + len(rows) > CHUNK:  # an embedding's rows stay in one chunk
                close()
            chunk.tokens.extend(rows)
            chunk.weights.extend([weight] * len(rows))
    if chunk.tokens or not chunks:
        close()
    return chunks


_AND = re.compile(r"\bAND\b")
_PART_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")
MAX_AND_PARTS = 32  # composable parts: each is encoded and runs through the UNet at every step


def _part_weight(part: str) -> tuple[str, float]:
    r"""``body :weight`` at the end of a part (A1111's ``^(.*?)(?:\s*:\s*(NUMBER))?\s*$``), found from
    the last colon instead of by a backtracking pattern, which took quadratic time on long runs of
    spaces (33 s for 20,000 characters)."""
    colon = part.rfind(":")
    if colon != -1:
        number = part[colon + 1 :].strip()
        if _PART_NUMBER.fullmatch(number):
            weight = float(number)
            if not abs(weight) <= MAX_WEIGHT:
                raise PromptError(f"AND part weight {_short(number)} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
            return part[:colon].rstrip(), weight
    return part.rstrip(), 1.0


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's composable prompts: ``a cat :1.2 AND a dog :0.8`` -> [("a cat", 1.2), ("a dog", 0.8)];
    ``AND`` in capitals as a word; a part without ``:weight`` at its end weighs 1; trailing white space
    is dropped, as A1111 does. At most ``MAX_AND_PARTS`` parts, weights within +-``MAX_WEIGHT``."""
    check_prompt(text)
    parts = _AND.split(text)
    if len(parts) > MAX_AND_PARTS:
        raise PromptError(f"prompt has {len(parts)} parts joined by AND; the limit is {MAX_AND_PARTS}")
    return [_part_weight(part) for part in parts]
