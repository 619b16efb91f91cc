"""A1111 prompt editing and alternation: which text the model sees at which step.

``[from:to:when]`` shows ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
after ``when``; ``[from::when]`` removes ``from`` after it. ``when`` with a decimal point is a fraction
of the steps (``0.5``), without one a step number (``10``). ``[a|b|c]`` cycles through its options
step by step. Emphasis brackets and plain text are kept verbatim for the emphasis parser.

The grammar is the one A1111 documents (prompt := emphasis | edit | alternation | plain text |
whitespace; plain text excludes ``\\ [ ] ( ) : |`` except escaped; stray ``[ ] ( ) :`` are literal at
the top level only). A prompt that does not parse is used as it is for every step, as A1111 does.

The parser memoizes what it parsed at each position (packrat parsing), so backtracking over nested
``[`` never parses the same text twice: time and memory grow with the length times the nesting depth,
both bounded by ``prompt.check_prompt`` before parsing. The number of edit/alternation options
(``MAX_ALTERNATIVES``) and of distinct texts in a schedule (``MAX_SCHEDULE_TEXTS``, each one is encoded)
are limited too; a prompt over a limit raises ``PromptError``.

``prompt_schedule(text, steps)`` returns ``[(last_step, text), ...]``: ``text`` applies to steps up to
and including ``last_step`` (1-based boundaries, as A1111's schedules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from latentforge.conditioning.prompt import PromptError, check_prompt

MAX_ALTERNATIVES = 200  # options of all [from:to:when] and [a|b] in one prompt
MAX_SCHEDULE_TEXTS = 100  # distinct prompt texts over the steps (each is encoded once)

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
    """Recursive descent with backtracking over the grammar above; nodes are str, list, _Edit, _Alternate.

    ``prompt(pos)`` and ``bracketed(pos)`` depend only on ``pos``, so their results are kept: each is
    computed once per position, whichever alternative of an enclosing ``[`` asks for it."""

    def __init__(self, text: str):
        self.text = text
        self._prompts: dict[int, tuple[list, int]] = {}
        self._bracketed: dict[int, object] = {}
        self.alternatives = 0

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
        if pos not in self._prompts:
            self._prompts[pos] = self._prompt(pos)
        return self._prompts[pos]

    def _prompt(self, pos: int) -> tuple[list, int]:
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
        if pos not in self._bracketed:
            self._bracketed[pos] = self._bracketed_at(pos)
        return self._bracketed[pos]

    def _bracketed_at(self, pos: int):
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
            self._count(1)
            return _Edit(None, first, closed[0]), closed[1]
        second, q = self.prompt(p + 1)
        if q >= len(self.text) or self.text[q] != ":":
            return None
        closed = self._number_close(q + 1)
        if closed:  # [from:to:when]
            self._count(2)
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
            self._count(len(options))
            return _Alternate(options), p + 1
        return None

    def _count(self, options: int) -> None:
        self.alternatives += options
        if self.alternatives > MAX_ALTERNATIVES:
            raise PromptError(
                f"prompt has more than {MAX_ALTERNATIVES} prompt-editing/alternation options ([a:b:when], "
                "[a|b]); use fewer"
            )


def _when(number: str, steps: int) -> int:
    value = float(number) * steps if "." in number else float(number)
    return steps if value >= steps else int(value)  # compared first: a huge number is inf


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
    """[(last_step, prompt text)] over ``steps`` steps; one entry when nothing is edited.

    Raises ``PromptError`` for a prompt over a limit (``check_prompt``, ``MAX_ALTERNATIVES``,
    ``MAX_SCHEDULE_TEXTS``)."""
    check_prompt(text)
    try:
        tree = _Parser(text).start()
    except _NoParse:
        return [(steps, text)]
    boundaries = {steps}
    _walk(tree, steps, boundaries)
    schedule = []
    texts: set[str] = set()
    for b in sorted(boundaries):
        entry = _text_at(tree, b, steps)
        texts.add(entry)
        if len(texts) > MAX_SCHEDULE_TEXTS:
            raise PromptError(
                f"prompt editing/alternation gives more than {MAX_SCHEDULE_TEXTS} different prompts over "
                f"{steps} steps (each is encoded); use fewer edits or alternations"
            )
        schedule.append((b, entry))
    return schedule
