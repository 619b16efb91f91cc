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
and including ``last_step`` (1-based boundaries, as A1111's schedules). Each step's text is put together
from the parsed prompt with its fixed text joined beforehand, so a schedule takes time in the number of
steps times the number of edits, not times the prompt's length. A hires pass goes on with the first
pass's timeline (``first_pass_steps``), as A1111 1.7+ does.
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


@dataclass
class _At:
    """An edit or alternation with its step resolved: ``when`` for an edit, None for an alternation;
    ``options`` are compiled node lists (an edit's: before, after)."""

    when: int | None
    options: list[list]


def _when(number: str, steps: int, first_pass_steps: int | None) -> int:
    """A1111's step of ``[a:b:when]`` (prompt_parser.get_learned_conditioning_prompt_schedules, the
    timeline of 1.7+): a fraction of the steps with a ".", else a step number; in a hires pass (after
    ``first_pass_steps``) fractions count from 1.0 and step numbers from the first pass's steps. Capped at
    ``steps``; anything below 1 is 0 (after the edit from the first step)."""
    value = float(number)
    if "." in number:
        value = (value - (0.0 if first_pass_steps is None else 1.0)) * steps
    elif first_pass_steps is not None:
        value -= first_pass_steps
    if value >= steps:  # compared first: a huge number is inf
        return steps
    return int(value) if value >= 1 else 0  # also -inf, which int() refuses


def _compile(nodes: list, steps: int, first: int | None, boundaries: set[int]) -> list:
    """The tree with each edit's step resolved (its boundary added to ``boundaries``), each alternation's
    boundaries (every step) added, and neighbouring fixed text joined into one string: a step's text
    then takes time in the number of edits and alternations, not the prompt's length."""
    out: list = []
    text: list[str] = []

    def add(item) -> None:
        if isinstance(item, str):
            text.append(item)
            return
        if text:
            out.append("".join(text))
            text.clear()
        out.append(item)

    for node in nodes:
        if isinstance(node, str):
            add(node)
        elif isinstance(node, _Edit):
            when = _when(node.when, steps, first)
            if when >= 1:
                boundaries.add(when)
            before = _compile(node.before or [], steps, first, boundaries)
            add(_At(when, [before, _compile(node.after, steps, first, boundaries)]))
        elif isinstance(node, _Alternate):
            boundaries.update(range(1, steps + 1))
            add(_At(None, [_compile(option, steps, first, boundaries) for option in node.options]))
        else:  # brackets: their items join the surrounding text
            for item in _compile(node, steps, first, boundaries):
                add(item)
    if text:
        out.append("".join(text))
    return out


def _text_at(items: list, step: int, out: list[str]) -> None:
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif item.when is None:
            _text_at(item.options[(step - 1) % len(item.options)], step, out)
        else:
            _text_at(item.options[0 if step <= item.when else 1], step, out)


def prompt_schedule(text: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last_step, prompt text)] over ``steps`` steps; one entry when nothing is edited.

    ``first_pass_steps``: this is the hires pass after a first pass of that many steps, where A1111 (1.7+)
    goes on with the first pass's timeline: ``[a:b:25]`` after 20 steps switches after step 5 of the
    hires pass, ``[a:b:1.5]`` halfway through it, and ``[a:b:10]`` or ``[a:b:0.5]`` shows ``b`` all along.
    None: a first pass.

    Raises ``PromptError`` for a prompt over a limit (``check_prompt``, ``MAX_ALTERNATIVES``,
    ``MAX_SCHEDULE_TEXTS``)."""
    check_prompt(text)
    try:
        tree = _Parser(text).start()
    except _NoParse:
        return [(steps, text)]
    boundaries = {steps}
    items = _compile(tree, steps, first_pass_steps, boundaries)
    schedule = []
    texts: dict[str, str] = {}  # one string object per different text
    for b in sorted(boundaries):
        parts: list[str] = []
        _text_at(items, b, parts)
        joined = "".join(parts)
        entry = texts.setdefault(joined, joined)
        if len(texts) > MAX_SCHEDULE_TEXTS:
            raise PromptError(
                f"prompt editing/alternation gives more than {MAX_SCHEDULE_TEXTS} different prompts over "
                f"{steps} steps (each is encoded); use fewer edits or alternations"
            )
        schedule.append((b, entry))
    return schedule
