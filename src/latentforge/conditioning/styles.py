"""A1111's saved prompt styles (``styles.csv``): reading, applying, recognising and writing them.

A style is a name with a prompt text and a negative prompt text. A request names styles (the A1111 API's
``styles: ["name", ...]``) and they are applied, in the order named, to the prompt and to the negative
prompt, as plain text before any prompt syntax is parsed. These are A1111's rules (``modules/styles.py``,
``merge_prompts`` and ``StyleDatabase`` in 1.10; where it applies them: ``modules/processing.py``,
``StableDiffusionProcessing.setup_prompts``):

- A style text that contains ``{prompt}`` has every ``{prompt}`` replaced by the prompt as it is (not
  stripped); the style text is not stripped either.
- Otherwise the prompt and the style text are each stripped and joined with ``", "``, leaving out
  whichever is empty: ``"cat"`` + ``"oil painting"`` gives ``"cat, oil painting"``, ``""`` + ``"oil
  painting"`` gives ``"oil painting"``, and a style with an empty text gives the prompt stripped.
- The positive text applies to the prompt, the negative text to the negative prompt, one style after the
  other (the second style applies to what the first made). A name given twice applies twice.
- A1111 applies styles to every prompt of the batch (``all_prompts``, ``all_negative_prompts``) and to the
  hires prompts, before extra networks (``<lora:...>``) are taken out and before prompt editing, BREAK and
  emphasis are parsed, so a style's text can hold any prompt syntax, extra networks included.

Where this module differs from A1111, on purpose:

- An unknown style name: A1111 uses an empty style for it (the prompt just gets stripped) and carries on;
  here it is refused (``UnknownStyleError``, naming it and listing the known ones), since dropping a style
  the user asked for changes the image without saying so.
- A styled prompt longer than ``MAX_PROMPT_CHARS`` (a style with two ``{prompt}`` doubles the prompt each
  time it is applied) and more than ``MAX_STYLES_PER_REQUEST`` names are refused.

Reading follows A1111's ``load_from_csv``: UTF-8 with or without a byte order mark (``utf-8-sig``),
Python's ``csv`` with ``skipinitialspace=True`` (spaces after a comma, and at the start of a line, are
dropped unless inside quotes), a header line naming the columns. ``name`` and ``prompt`` are needed (an
old file's ``text`` column stands for ``prompt``); ``negative_prompt`` may be missing (then empty); other
columns (notes, descriptions) are ignored. A row whose name starts with ``#`` is a comment; blank lines
are skipped; a row with fewer values than the header has the missing ones empty (A1111 keeps them as
``None`` and fails when such a style is used). When names repeat, the later row wins (in a later file
too), keeping the place of the first, as a Python dict does in A1111. A1111 reads ``styles.csv`` in its
data folder by default; ``--styles-file`` (given any number of times) names files or wildcard patterns
(``styles*.csv``: ``*`` or ``?`` in the file name), read in the order given. When it reads several files,
A1111 also puts a divider entry per file in its list, for its menu; those are not styles here.

A damaged file is refused, naming the file, the line and what to do, where A1111 reads what it can and
logs the rest: over ``MAX_STYLES_FILE_BYTES``, not UTF-8 (UTF-16 too), NUL bytes, bad quoting (an
unclosed quote would swallow the rest of the file into one prompt; ``"a"b`` is refused rather than read as
``ab``), a field over Python's csv limit (131072 characters), a row with more values than the header has
columns (most often an unquoted comma in a prompt), no usable header line.

``extract_styles`` is the inverse, used when reading an infotext back (A1111 fills its "Styles array" with
``StyleDatabase.extract_styles_from_prompt``): it takes off a style whose texts end the prompts (or wrap
them, for ``{prompt}``), repeats until none does, and gives the names in the order they were applied.
Unlike A1111 it checks each match by applying the style again, so ``cat`` is not taken off ``wildcat``
and a style with two ``{prompt}`` works (A1111 raises on it).
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.conditioning.prompt import MAX_PROMPT_CHARS, PromptError

PLACEHOLDER = "{prompt}"
MAX_STYLES_FILE_BYTES = 16 * 1024 * 1024  # a real styles.csv is kilobytes; the largest shared ones ~1 MiB
MAX_STYLES_FILES = 256  # files one call reads (wildcards included)
MAX_STYLES_PER_REQUEST = 64  # style names one request may apply
CSV_FIELD_LIMIT = 131072  # Python's csv.field_size_limit() default, which A1111 does not change
_SHOWN_NAMES = 40  # known names listed in an unknown-style message
_SUGGESTED = 3  # unknown names given close matches in that message
_SUGGEST_MAX_CHARS = 100  # ... when at most this long
_SUGGEST_MAX_STYLES = 2000  # ... against at most this many known styles


class StylesFileError(ValueError):
    """A styles file that cannot be read; the message names the file, the line where known, and the fix.
    ``path``: that file, when ``read_styles`` read it."""

    path: Path | None = None


class UnknownStyleError(KeyError, ValueError):
    """A style name that is not among the known styles; the message lists them."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PromptStyle:
    """One saved style: its name, the text for the prompt and the text for the negative prompt.

    ``source`` says where it was read (``file:line``), for messages; it is not part of the style."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    source: str | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------------------------- applying


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style text applied to one prompt, by A1111's rule (``merge_prompts``): ``{prompt}`` in the
    style text is replaced by the prompt, else both are stripped and joined with ", " (empty ones left
    out)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def _merged_length(style_text: str, prompt: str) -> int:
    """The length ``merge_prompt`` would give, found without building it (a guard against doubling)."""
    count = style_text.count(PLACEHOLDER)
    if count:
        return len(style_text) + count * (len(prompt) - len(PLACEHOLDER))
    return len(style_text) + len(prompt) + 2


def _check_names(names: object) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"style names must be a list of names, not {type(names).__name__}: {names!r:.80}")
    names = list(names)
    if len(names) > MAX_STYLES_PER_REQUEST:
        raise ValueError(
            f"{len(names)} style names; at most {MAX_STYLES_PER_REQUEST} can be applied at once: "
            "name fewer styles, or put the text in the prompt"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"a style name must be a string, not {type(name).__name__}: {name!r:.80}")
    return names


def unknown_style_message(unknown: Sequence[str], styles: Mapping[str, PromptStyle]) -> str:
    """'unknown style 'x'' with close matches and the known names (the first ``_SHOWN_NAMES``)."""
    known = list(styles)
    parts = []
    for i, name in enumerate(unknown):
        # close matches for the first few short names only: difflib is quadratic in the lengths, and a
        # request may name 64 unknown styles against a file of thousands (bounded time, hostile input)
        searchable = i < _SUGGESTED and len(name) <= _SUGGEST_MAX_CHARS and len(known) <= _SUGGEST_MAX_STYLES
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) if searchable else []
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{name!r:.200}{hint}")
    what = "unknown style" if len(unknown) == 1 else "unknown styles"
    if not known:
        listing = "no styles are loaded (read a styles.csv first)"
    else:
        shown = ", ".join(repr(n) for n in known[:_SHOWN_NAMES])
        more = f" and {len(known) - _SHOWN_NAMES} more" if len(known) > _SHOWN_NAMES else ""
        listing = f"known styles: {shown}{more}"
    return f"{what} {'; '.join(parts)}; {listing}. Names must match exactly (case and spaces)"


def apply_styles(
    prompt: str, negative_prompt: str, names: Iterable[str], styles: Mapping[str, PromptStyle]
) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order (A1111's rules: see the
    module's docstring). No names: both unchanged. An unknown name raises ``UnknownStyleError`` (all unknown
    names at once, before anything is applied); a result over ``MAX_PROMPT_CHARS`` raises ``PromptError``."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("the prompt and the negative prompt must be strings")
    names = _check_names(names)
    unknown = list(dict.fromkeys(n for n in names if n not in styles))
    if unknown:
        raise UnknownStyleError(unknown_style_message(unknown, styles))
    for name in names:
        style = styles[name]
        for what, text, current in (
            ("prompt", style.prompt, prompt),
            ("negative prompt", style.negative_prompt, negative_prompt),
        ):
            if _merged_length(text, current) > MAX_PROMPT_CHARS:
                raise PromptError(
                    f"applying style {name!r} would make the {what} longer than {MAX_PROMPT_CHARS} characters "
                    "(a style with {prompt} more than once doubles the prompt); use fewer styles or a shorter prompt"
                )
        prompt = merge_prompt(style.prompt, prompt)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def apply_styles_to_passes(
    prompts: tuple[str, str, str, str], names: Iterable[str], styles: Mapping[str, PromptStyle]
) -> tuple[str, str, str, str]:
    """``apply_styles`` on a txt2img request's (prompt, negative prompt, hires prompt, hires negative
    prompt), as A1111's ``setup_prompts`` styles all of them. An empty hires prompt means the first pass's
    (its styled text) and stays empty."""
    prompt, negative, hr_prompt, hr_negative = prompts
    prompt, negative = apply_styles(prompt, negative, names, styles)
    if hr_prompt or hr_negative:
        styled = apply_styles(hr_prompt, hr_negative, names, styles)
        hr_prompt, hr_negative = (styled[0] if hr_prompt else hr_prompt), (styled[1] if hr_negative else hr_negative)
    return prompt, negative, hr_prompt, hr_negative


# ------------------------------------------------------------------------------------------- recognising


def _take_off(style_text: str, text: str) -> str | None:
    """The prompt that ``style_text`` was applied to, to give ``text`` (both compared stripped, as A1111
    does), or None when it was not. Checked by applying it again."""
    text = text.strip()
    style = style_text.strip()
    if PLACEHOLDER in style:
        parts = style.split(PLACEHOLDER)
        count = len(parts) - 1
        spare = len(text) - sum(len(p) for p in parts)
        if spare < 0 or spare % count:
            return None
        start = len(parts[0])
        inner = text[start : start + spare // count]
        return inner if style.replace(PLACEHOLDER, inner) == text else None
    if not text.endswith(style):
        return None
    inner = text[: len(text) - len(style)]
    if inner.endswith(", "):
        inner = inner[:-2]
    return inner if merge_prompt(style, inner) == text else None


def extract_styles(prompt: str, negative_prompt: str, styles: Mapping[str, PromptStyle]) -> tuple[list[str], str, str]:
    """The styles that were applied to give this prompt and negative prompt (as read from an infotext),
    in the order they were applied, and the prompts without them.

    As A1111's ``extract_styles_from_prompt``: look through the styles in their order for one whose
    positive and negative texts both match (a text without ``{prompt}`` ends the prompt, after ", " or as
    the whole prompt; one with ``{prompt}`` wraps it), take it off, and start again without it, until none
    matches; a style whose two texts are empty is never found. Texts are compared stripped. Unlike
    A1111, a match must give the same text when the style is applied again."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("the prompt and the negative prompt must be strings")
    remaining = [s for s in styles.values() if s.prompt or s.negative_prompt]
    found: list[str] = []
    while True:
        for i, style in enumerate(remaining):
            positive = _take_off(style.prompt, prompt)
            if positive is None:
                continue
            negative = _take_off(style.negative_prompt, negative_prompt)
            if negative is None:
                continue
            prompt, negative_prompt = positive, negative
            found.append(style.name)
            del remaining[i]
            break
        else:
            break
    return found[::-1], prompt, negative_prompt


# ------------------------------------------------------------------------------------------------ reading


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike], missing_ok: bool) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if "*" in path.name or "?" in path.name:  # A1111: a wildcard only in the file name
            folder = path.parent
            matches = sorted(p for p in folder.glob(path.name) if p.is_file()) if folder.is_dir() else []
            files.extend(matches)  # sorted: A1111 takes the folder's listing order, which varies
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise StylesFileError(f"{path}: not a file; name a styles .csv file")
        elif not missing_ok:
            raise FileNotFoundError(
                f"styles file {path} does not exist; check the path (A1111 keeps styles.csv in its folder)"
            )
    unique = list(dict.fromkeys(files))
    if len(unique) > MAX_STYLES_FILES:
        raise StylesFileError(
            f"{len(unique)} styles files; at most {MAX_STYLES_FILES} are read: name fewer files or a narrower pattern"
        )
    return unique


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise StylesFileError(
            f"{path}: UTF-16 text; A1111 reads styles files as UTF-8: save it as 'CSV UTF-8' (Excel) or with "
            "encoding UTF-8"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise StylesFileError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, offset {e.start}); A1111 reads "
            "styles files as UTF-8: save it as 'CSV UTF-8' (Excel) or with encoding UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise StylesFileError(
            f"{path}: a NUL byte at line {line}: this is not a UTF-8 text CSV file (UTF-16 without a byte order "
            "mark, or not text at all); save it as UTF-8 or name a styles .csv file"
        )
    return text


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise StylesFileError(f"{path}: not a regular file; name a styles .csv file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise StylesFileError(
                    f"{path}: {size} bytes; a styles file may have at most {max_bytes} bytes (real ones have a "
                    "few kilobytes): split it into several files or check that it is the right file"
                )
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise StylesFileError(
            f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions"
        ) from None
    if len(data) > max_bytes:
        raise StylesFileError(f"{path}: more than {max_bytes} bytes; a styles file may have at most that many")
    return data


_HEADER_HELP = "the first line must name the columns: name,prompt,negative_prompt"


def _header(path: Path, row: list[str]) -> dict[str, int]:
    if not row:
        raise StylesFileError(f"{path}: line 1 is empty; {_HEADER_HELP}")
    columns: dict[str, int] = {}
    for i, name in enumerate(row):
        if name in columns and name in ("name", "prompt", "text", "negative_prompt"):
            raise StylesFileError(f"{path}: column {name!r} appears twice in the header; keep one")
        columns.setdefault(name, i)
    if "name" not in columns or ("prompt" not in columns and "text" not in columns):
        found = ",".join(repr(c) for c in row[:10])
        raise StylesFileError(
            f"{path}: no 'name' and 'prompt' columns in the header (found {found:.300}); {_HEADER_HELP}"
        )
    return columns


def read_styles_file(path: str | os.PathLike, *, max_bytes: int = MAX_STYLES_FILE_BYTES) -> dict[str, PromptStyle]:
    """The styles of one A1111 styles.csv, in file order (a later row with the same name replaces the
    earlier one in its place). Raises ``StylesFileError`` for a damaged file (see the module's docstring)."""
    path = Path(path)
    text = _decode(path, _read_bytes(path, max_bytes))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    styles: dict[str, PromptStyle] = {}
    header: list[str] | None = None
    line = 1  # where the row being read starts
    try:
        for row in reader:
            if header is None:
                header = row
                columns = _header(path, row)
                at = (columns["name"], columns.get("prompt", columns.get("text")), columns.get("negative_prompt"))
            elif len(row) > len(header):
                raise StylesFileError(
                    f"{path}, line {line}: {len(row)} values but the header names {len(header)} columns; "
                    "a value with a comma (or a quote, or a line break) must be in double quotes, a quote "
                    'inside written twice: "masterpiece, best quality"'
                )
            elif row:  # not a blank line (DictReader skips those too)
                # a short row: the missing values are empty
                name, prompt, negative = (row[i] if i is not None and i < len(row) else "" for i in at)
                if not name.startswith("#") and (name or prompt or negative):  # '#': a comment, as in A1111
                    styles[name] = PromptStyle(name, prompt, negative, source=f"{path}:{line}")
            line = reader.line_num + 1
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise StylesFileError(
                f"{path}, line {line}: a value longer than {CSV_FIELD_LIMIT} characters, which A1111's csv reader "
                "refuses too; check the file (an unclosed quote makes the rest of the file one value)"
            ) from None
        raise StylesFileError(
            f"{path}, line {line}: bad CSV quoting ({e}); a value with a comma, quote or line break must be in "
            'double quotes with each quote inside written twice ("a ""quoted"" word"), and every quote closed'
        ) from None
    return styles


def read_styles(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    missing_ok: bool = False,
    max_bytes: int = MAX_STYLES_FILE_BYTES,
) -> dict[str, PromptStyle]:
    """All styles of A1111 styles files, by name: ``paths`` is a file, a wildcard pattern in the file name
    (``styles*.csv``) or a list of them, read in order (a pattern's files in name order), the same file
    once. When names repeat, the later one wins, in the place of the first (as A1111). A file that does
    not exist raises ``FileNotFoundError`` unless ``missing_ok`` (A1111 skips it: a fresh install has no
    styles.csv); a pattern that matches nothing reads nothing."""
    styles: dict[str, PromptStyle] = {}
    for path in _expand(paths, missing_ok):
        try:
            styles.update(read_styles_file(path, max_bytes=max_bytes))
        except StylesFileError as e:
            e.path = Path(path)  # the file the message names (a server shows its name only)
            raise
    return styles


# ------------------------------------------------------------------------------------------------ writing


def _csv_field(value: str) -> str:
    # Quoted when csv needs it, and when it starts with whitespace: A1111 reads with skipinitialspace, which
    # would drop leading spaces of an unquoted value.
    if value and (value[0].isspace() or any(c in value for c in ',"\r\n')):
        return '"' + value.replace('"', '""') + '"'
    return value


def write_styles(
    path: str | os.PathLike, styles: Mapping[str, PromptStyle] | Iterable[PromptStyle], *, overwrite: bool = False
) -> None:
    """Write styles as an A1111 styles.csv (columns name,prompt,negative_prompt; UTF-8 with a byte order
    mark and CRLF line ends, as A1111 writes it), atomically: a temporary file in the same folder, then
    renamed into place. An existing file raises ``FileExistsError`` unless ``overwrite``. Refused: a name
    starting with '#' or a style with no name and no text (they would not be read back), NUL characters,
    values over ``CSV_FIELD_LIMIT`` characters, two styles with the same name."""
    path = Path(path)
    items = list(styles.values()) if isinstance(styles, Mapping) else list(styles)
    seen: set[str] = set()
    lines = ["name,prompt,negative_prompt"]
    for style in items:
        if not isinstance(style, PromptStyle):
            raise TypeError(f"styles must be PromptStyle values, not {type(style).__name__}")
        fields = (style.name, style.prompt, style.negative_prompt)
        if style.name in seen:
            raise ValueError(f"style {style.name!r} is given twice; keep one")
        seen.add(style.name)
        if style.name.startswith("#"):
            raise ValueError(f"style name {style.name!r} starts with '#', which A1111 reads as a comment; rename it")
        if not any(fields):
            raise ValueError("a style with no name and no text would not be read back; leave it out")
        for value in fields:
            if not isinstance(value, str):
                raise TypeError(f"style {style.name!r}: texts must be strings")
            if "\x00" in value:
                raise ValueError(f"style {style.name!r}: a NUL character cannot be written to a CSV file")
            if len(value) > CSV_FIELD_LIMIT:
                raise ValueError(f"style {style.name!r}: a text over {CSV_FIELD_LIMIT} characters cannot be read back")
        lines.append(",".join(_csv_field(v) for v in fields))
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8-sig")

    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another name")
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # a link fails if the name appeared meanwhile, where a rename would replace it
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"{path} exists; pass overwrite=True to replace it, or choose another name"
                ) from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
