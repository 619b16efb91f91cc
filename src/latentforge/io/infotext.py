"""A1111's "parameters" text ("infotext"): the prompt, the negative prompt and a line of settings.

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

A value holding ',', ':' or a newline is written as a JSON string. A reader takes the last line as
settings only if it has at least three ``Key: value`` pairs; unknown keys are kept.
"""

from __future__ import annotations

import json
import re

_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The text A1111 stores in a PNG's ``parameters`` chunk. ``params`` in A1111's key order;
    None values are left out. Stripped as A1111's ``create_infotext`` strips it (an empty prompt leaves no
    empty first line)."""
    settings = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(settings)
    return "\n".join(lines).strip()


def _pairs(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if not m or m.end() == pos:
            break
        out[m.group(1).strip()] = unquote(m.group(2))
        pos = m.end()
    return out


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) from an infotext; settings values are strings."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines:
        pairs = _pairs(lines[-1])
        if len(pairs) >= 3:
            settings = pairs
            lines = lines[:-1]
    prompt_lines, negative_lines = [], []
    target = prompt_lines
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        target.append(line)
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), settings
