"""A1111 prompt editing and alternation: which text the model sees at which step.

``[from:to:when]`` shows ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
after ``when``; ``[from::when]`` removes ``from`` after it. ``when`` with a decimal point is a fraction
of the steps (``0.5``), without one a step number (``10``). ``[a|b|c]`` cycles through its options
step by step. Emphasis brackets and plain text are kept verbatim for the emphasis parser.

The grammar is the one A1111 documents (prompt := emphasis | edit | alternation | plain text |
whitespace; plain text excludes ``\\ [ ] ( ) : |`` except escaped; stray ``[ ] ( ) :`` are literal at
the top level only). A prompt that does not parse is used as it is for every step, as A1111 does.

``prompt_schedule(text, steps)`` returns ``[(last_step, text), ...]``: ``text`` applies to steps up to
and including ``last_step`` (1-based boundaries, as A1111's schedules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_STRAY = re.compile(r"[\[\]():]")  # one character at a time, so a "[" after it can still open an edit


class _NoParse(Exception):
    pass


@dataclass
class _Edit:
    before: list | None
    after: list
    when: str  # the number as written: a "." makes it a fraction of the steps


@dataclass
class _Alternate:
    options: list[list]


class _Parser:
    """Recursive descent with backtracking over the grammar above; nodes are str, list, _Edit, _Alternate."""

    def __init__(self, text: str):
        self.text = text

    def start(self) -> list:
        out: list = []
        pos = 0
        while pos < len(self.text):
            nodes, end = self.prompt(pos)
            if end > pos:
                out.extend(nodes)
                pos = end
                continue
            m = _STRAY.match(self.text, pos)
            if not m:
                raise _NoParse  # e.g. a '|' outside brackets
            out.append(m.group(0))
            pos = m.end()
        return out

    def prompt(self, pos: int) -> tuple[list, int]:
        """As many prompt items as parse from ``pos`` (possibly none)."""
        nodes: list = []
        while pos < len(self.text):
            m = _PLAIN.match(self.text, pos) or _WS.match(self.text, pos)
            if m:
                nodes.append(m.group(0))
                pos = m.end()
                continue
            item = self.bracketed(pos)
            if item is None:
                break
            node, pos = item
            nodes.append(node)
        return nodes, pos

    def bracketed(self, pos: int):
        ch = self.text[pos]
        if ch == "(":
            inner, p = self.prompt(pos + 1)
            if p < len(self.text) and self.text[p] == ")":
                return ["(", *inner, ")"], p + 1
            if p < len(self.text) and self.text[p] == ":":
                second, q = self.prompt(p + 1)
                if q < len(self.text) and self.text[q] == ")":
                    return ["(", *inner, ":", *second, ")"], q + 1
            return None
        if ch == "[":
            return self.edit(pos) or self.alternate(pos) or self.square(pos)
        return None

    def square(self, pos: int):
        inner, p = self.prompt(pos + 1)
        if p < len(self.text) and self.text[p] == "]":
            return ["[", *inner, "]"], p + 1
        return None

    def _number_close(self, p: int):
        """``[WS] NUMBER [WS] ]`` from ``p``: (number text, position after ']') or None."""
        m = _WS.match(self.text, p)
        p = m.end() if m else p
        num = _NUMBER.match(self.text, p)
        if not num:
            return None
        p = num.end()
        m = _WS.match(self.text, p)
        p = m.end() if m else p
        if p < len(self.text) and self.text[p] == "]":
            return num.group(0), p + 1
        return None

    def edit(self, pos: int):
        first, p = self.prompt(pos + 1)
        if p >= len(self.text) or self.text[p] != ":":
            return None
        closed = self._number_close(p + 1)
        if closed:  # [to:when]
            return _Edit(None, first, closed[0]), closed[1]
        second, q = self.prompt(p + 1)
        if q >= len(self.text) or self.text[q] != ":":
            return None
        closed = self._number_close(q + 1)
        if closed:  # [from:to:when]
            return _Edit(first, second, closed[0]), closed[1]
        return None

    def alternate(self, pos: int):
        options = []
        option, p = self.prompt(pos + 1)
        options.append(option)
        while p < len(self.text) and self.text[p] == "|":
            option, p = self.prompt(p + 1)
            options.append(option)
        if len(options) > 1 and p < len(self.text) and self.text[p] == "]":
            return _Alternate(options), p + 1
        return None


def _when(number: str, steps: int) -> int:
    value = float(number) * steps if "." in number else float(number)
    return min(steps, int(value))


def _walk(nodes: list, steps: int, boundaries: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            when = _when(node.when, steps)
            if when >= 1:
                boundaries.add(when)
            _walk(node.before or [], steps, boundaries)
            _walk(node.after, steps, boundaries)
        elif isinstance(node, _Alternate):
            boundaries.update(range(1, steps + 1))
            for option in node.options:
                _walk(option, steps, boundaries)
        elif isinstance(node, list):
            _walk(node, steps, boundaries)


def _text_at(nodes: list, step: int, steps: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or []) if step <= _when(node.when, steps) else node.after
            parts.append(_text_at(chosen, step, steps))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            parts.append(_text_at(node, step, steps))
    return "".join(parts)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last_step, prompt text)] over ``steps`` steps; one entry when nothing is edited."""
    try:
        tree = _Parser(text).start()
    except _NoParse:
        return [(steps, text)]
    boundaries = {steps}
    _walk(tree, steps, boundaries)
    return [(b, _text_at(tree, b, steps)) for b in sorted(boundaries)]
