"""A1111 saved prompt styles (styles.csv): applying, reading, recognising and writing them.

Where the expected values come from (A1111 stable-diffusion-webui 1.10, ``modules/styles.py``):
- [merge] ``merge_prompts``: ``"{prompt}" in style`` -> ``style.replace("{prompt}", prompt)``; else
  ``", ".join(filter(None, (prompt.strip(), style.strip())))``.
- [order] ``apply_styles_to_prompt`` folds the styles in the order named; ``StyleDatabase`` applies the
  ``prompt`` texts to the prompt and the ``negative_prompt`` texts to the negative prompt
  (``processing.py``, ``setup_prompts``).
- [csv] ``load_from_csv``: ``open(encoding="utf-8-sig", newline="")``, ``csv.DictReader(skipinitialspace=True)``,
  rows whose name starts with ``#`` skipped, ``row["prompt"]`` else ``row["text"]``,
  ``row.get("negative_prompt", "")``, ``styles[name] = ...`` (a later duplicate replaces the earlier).
- [extract] ``extract_style_text_from_prompt`` and ``extract_styles_from_prompt``, with the examples in
  its docstring; the result is reversed into the order of application.
- [save] ``save_styles`` writes ``utf-8-sig`` (a BOM) through ``csv.DictWriter`` (CRLF line ends) with the
  columns name,prompt,negative_prompt.
"""

from __future__ import annotations

import os

import pytest

from latentforge.conditioning.prompt import MAX_PROMPT_CHARS, PromptError
from latentforge.conditioning.styles import (
    MAX_STYLES_FILE_BYTES,
    MAX_STYLES_PER_REQUEST,
    PromptStyle,
    StylesFileError,
    UnknownStyleError,
    apply_styles,
    extract_styles,
    merge_prompt,
    read_styles,
    read_styles_file,
    write_styles,
)


def _db(*styles: PromptStyle) -> dict[str, PromptStyle]:
    return {s.name: s for s in styles}


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------ merge [merge]


@pytest.mark.parametrize(
    "style, prompt, expected",
    [
        ("masterpiece, {prompt}, best quality", "a cat", "masterpiece, a cat, best quality"),
        ("{prompt}!", " cat ", " cat !"),  # placeholder: neither side stripped
        ("{prompt} and {prompt}", "x", "x and x"),  # every placeholder replaced
        ("({prompt})", "", "()"),
        ("oil painting", "a cat", "a cat, oil painting"),  # appended with ", "
        ("  oil painting ", " a cat  ", "a cat, oil painting"),  # both stripped first
        ("oil painting", "", "oil painting"),  # empty prompt: no leading ", "
        ("oil painting", "   ", "oil painting"),
        ("", " a cat ", "a cat"),  # empty style text: the prompt, stripped
        ("", "", ""),
        ("Oil, {Prompt}", "cat", "cat, Oil, {Prompt}"),  # the placeholder is case-sensitive
    ],
)
def test_merge_prompt_follows_a1111(style, prompt, expected):
    assert merge_prompt(style, prompt) == expected


# ---------------------------------------------------------------------------------------- apply [order]

RED = PromptStyle("red", "red", "green")
WRAP = PromptStyle("wrap", "({prompt}:1.2)", "")
PHOTO = PromptStyle("Photo", "photo of {prompt}, 35mm", "{prompt}, cartoon")
EMPTY = PromptStyle("empty", "", "")


def test_apply_styles_in_the_order_named():
    db = _db(RED, WRAP, PHOTO)
    assert apply_styles("cat", "", ["red", "wrap"], db) == ("(cat, red:1.2)", "green")
    assert apply_styles("cat", "", ["wrap", "red"], db) == ("(cat:1.2), red", "green")
    assert apply_styles("cat", "lowres", ["red", "Photo"], db) == ("photo of cat, red, 35mm", "lowres, green, cartoon")


def test_apply_styles_negative_prompt():
    db = _db(RED, PHOTO)
    assert apply_styles("cat", "lowres", ["red"], db) == ("cat, red", "lowres, green")
    assert apply_styles("cat", "", ["red"], db) == ("cat, red", "green")
    assert apply_styles("cat", "", ["Photo"], db) == ("photo of cat, 35mm", ", cartoon")  # placeholder: as is


def test_apply_styles_edge_cases():
    db = _db(RED, EMPTY)
    assert apply_styles(" cat ", " bad ", [], db) == (" cat ", " bad ")  # no styles: untouched
    assert apply_styles(" cat ", " bad ", ["empty"], db) == ("cat", "bad")  # an empty style strips
    assert apply_styles("", "", ["red"], db) == ("red", "green")
    assert apply_styles("cat", "", ["red", "red"], db) == ("cat, red, red", "green, green")  # twice: twice
    assert apply_styles("cat", "", ("red",), db) == ("cat, red", "green")  # any iterable of names


def test_unknown_style_is_refused_with_the_known_names():
    db = _db(RED, WRAP, PHOTO)
    with pytest.raises(UnknownStyleError) as e:
        apply_styles("cat", "", ["red", "photo", "nope"], db)
    message = str(e.value)
    assert "'photo'" in message and "did you mean 'Photo'" in message  # case matters, as in A1111's dict
    assert "'nope'" in message
    assert "known styles: 'red', 'wrap', 'Photo'" in message
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownStyleError, match="no styles are loaded"):
        apply_styles("cat", "", ["red"], {})
    with pytest.raises(UnknownStyleError, match=r"'red '"):  # names match exactly, spaces too
        apply_styles("cat", "", ["red "], db)


def test_apply_styles_refuses_bad_names_and_runaway_prompts():
    db = _db(RED, PromptStyle("double", "{prompt} {prompt}", ""))
    with pytest.raises(TypeError, match="list of names"):
        apply_styles("cat", "", "red", db)  # a string would be read as one-letter names
    with pytest.raises(TypeError, match="must be a string"):
        apply_styles("cat", "", [1], db)
    with pytest.raises(ValueError, match=f"at most {MAX_STYLES_PER_REQUEST}"):
        apply_styles("cat", "", ["red"] * (MAX_STYLES_PER_REQUEST + 1), db)
    with pytest.raises(PromptError, match=f"longer than {MAX_PROMPT_CHARS}"):
        apply_styles("x" * 1000, "", ["double"] * 10, db)  # doubles: 1000 * 2**10 characters
    assert apply_styles("ab", "", ["double"] * 3, db)[0] == " ".join(["ab"] * 8)


# --------------------------------------------------------------------------------------------- read [csv]


def test_read_quoted_commas_newlines_and_crlf(tmp_path):
    f = _write(
        tmp_path / "styles.csv",
        "name,prompt,negative_prompt\r\n"
        'Cinematic,"cinematic still of {prompt}, film grain","anime, cartoon"\r\n'
        'Lines,"line one\r\nline two","say ""no"""\r\n'
        "Plain,a cat,\r\n",
    )
    styles = read_styles(f)
    assert list(styles) == ["Cinematic", "Lines", "Plain"]
    assert styles["Cinematic"] == PromptStyle("Cinematic", "cinematic still of {prompt}, film grain", "anime, cartoon")
    assert styles["Lines"] == PromptStyle("Lines", "line one\r\nline two", 'say "no"')
    assert styles["Plain"] == PromptStyle("Plain", "a cat", "")
    assert styles["Lines"].source == f"{f}:3"


def test_read_bom_missing_negative_extra_columns_and_old_text_column(tmp_path):
    bom = _write(tmp_path / "bom.csv", b"\xef\xbb\xbfname,prompt,negative_prompt\r\nA,a,b\r\n")
    assert read_styles(bom) == {"A": PromptStyle("A", "a", "b")}  # the BOM is not part of 'name'
    no_negative = _write(tmp_path / "noneg.csv", "name,prompt\nA,a\n")
    assert read_styles(no_negative) == {"A": PromptStyle("A", "a", "")}
    extra = _write(tmp_path / "extra.csv", "notes,prompt,name,negative_prompt,description\nhi,a,A,b,long\n")
    assert read_styles(extra) == {"A": PromptStyle("A", "a", "b")}  # by column name; the rest ignored
    old = _write(tmp_path / "old.csv", "name,text\nA,old style\n")  # A1111's first format
    assert read_styles(old) == {"A": PromptStyle("A", "old style", "")}


def test_read_comments_blank_lines_short_rows_and_spaces(tmp_path):
    f = _write(
        tmp_path / "styles.csv",
        "name, prompt, negative_prompt\n"  # spaces after commas are skipped (skipinitialspace)
        "# a comment,not,a style\n"
        "  #indented comment,x,y\n"
        "\n"
        "Short,only a prompt\n"  # missing values are empty
        "Bare\n"
        ", ,\n"  # no name and no text: nothing
        'Spaced, a cat ,"  kept"\n',
    )
    styles = read_styles(f)
    assert styles == {
        "Short": PromptStyle("Short", "only a prompt", ""),
        "Bare": PromptStyle("Bare", "", ""),
        "Spaced": PromptStyle("Spaced", "a cat ", "  kept"),  # leading space dropped, trailing kept; quoted kept
    }


def test_duplicate_names_the_later_wins_in_the_place_of_the_first(tmp_path):
    a = _write(tmp_path / "styles.csv", "name,prompt\nX,first\nY,y\nX,second\n")
    assert read_styles(a) == {"X": PromptStyle("X", "second"), "Y": PromptStyle("Y", "y")}
    assert list(read_styles(a)) == ["X", "Y"]
    b = _write(tmp_path / "styles-more.csv", "name,prompt\nY,from the later file\nZ,z\n")
    both = read_styles([a, b])
    assert list(both) == ["X", "Y", "Z"] and both["Y"].prompt == "from the later file"
    assert read_styles([b, a])["Y"].prompt == "y"


def test_several_files_and_wildcards(tmp_path):
    _write(tmp_path / "styles.csv", "name,prompt\nA,a\n")
    _write(tmp_path / "styles_b.csv", "name,prompt\nB,b\n")
    _write(tmp_path / "styles_a.csv", "name,prompt\nA,from styles_a\n")
    _write(tmp_path / "other.csv", "name,prompt\nO,o\n")
    (tmp_path / "styles_dir.csv").mkdir()  # a folder that matches the pattern is not read
    # as A1111's default list with a pattern: styles.csv once, then the matches (in name order here)
    styles = read_styles([tmp_path / "styles.csv", tmp_path / "styles*.csv"])
    assert styles == {"A": PromptStyle("A", "from styles_a"), "B": PromptStyle("B", "b")}
    assert read_styles(str(tmp_path / "nothing*.csv")) == {}
    assert read_styles(tmp_path / "style?.csv") == {"A": PromptStyle("A", "a")}


def test_missing_files_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_styles(tmp_path / "styles.csv")
    assert read_styles(tmp_path / "styles.csv", missing_ok=True) == {}
    assert read_styles(_write(tmp_path / "empty.csv", "")) == {}
    assert read_styles(_write(tmp_path / "header.csv", "\ufeffname,prompt,negative_prompt\r\n")) == {}
    with pytest.raises(StylesFileError, match="not a file"):
        read_styles(tmp_path)


# ----------------------------------------------------------------------------------------- hostile files


def test_a_huge_file_is_refused_before_reading(tmp_path):
    f = tmp_path / "styles.csv"
    with open(f, "wb") as out:
        out.write(b"name,prompt\n")
        out.truncate(MAX_STYLES_FILE_BYTES + 1)  # sparse: no 16 MiB written
    with pytest.raises(StylesFileError, match=f"at most {MAX_STYLES_FILE_BYTES} bytes"):
        read_styles(f)
    small = _write(tmp_path / "small.csv", "name,prompt\n" + "A,a\n" * 10)
    with pytest.raises(StylesFileError, match="at most 20 bytes"):
        read_styles(small, max_bytes=20)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", r"not UTF-8 text \(byte 0x89 at line 1"),
        (
            "name,prompt\nCaf\u00e9,x\n".encode("cp1252"),
            r"not UTF-8 text \(byte 0xe9 at line 2.*save it as 'CSV UTF-8'",
        ),
        ("name,prompt\nA,a\n".encode("utf-16"), "UTF-16"),
        (b"name,prompt\nA,a\x00b\n", "a NUL byte at line 2"),
        (b'name,prompt\nA,"unclosed\nB,b\nC,c\n', r"line 2: bad CSV quoting"),
        (b'name,prompt\nA,"a"b\n', r"line 2: bad CSV quoting"),
        (
            b"name,prompt,negative_prompt\nA,masterpiece, best quality,lowres,blurry\n",
            r"line 2: 5 values.*double quotes",
        ),
        (b"name,prompt\nA," + b"x" * 140_000 + b"\n", r"line 2: a value longer than 131072"),
        (b"Name,Prompt\nA,a\n", "no 'name' and 'prompt' columns"),
        (b"prompt,negative_prompt\na,b\n", "no 'name' and 'prompt' columns"),
        (b"\nname,prompt\nA,a\n", "line 1 is empty"),
        (b"name,prompt,prompt\nA,a,b\n", "column 'prompt' appears twice"),
    ],
)
def test_damaged_files_are_refused_with_the_file_and_the_line(tmp_path, data, match):
    f = _write(tmp_path / "styles.csv", data)
    with pytest.raises(StylesFileError, match=match) as e:
        read_styles(f)
    assert str(f) in str(e.value)


def test_random_bytes_never_escape_as_other_errors(tmp_path):
    import random

    rng = random.Random(1234)
    f = tmp_path / "styles.csv"
    for _ in range(200):
        f.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        try:
            styles = read_styles_file(f)
        except StylesFileError:
            continue
        assert all(isinstance(s, PromptStyle) for s in styles.values())


# ------------------------------------------------------------------------------------------- extract [extract]


def test_extract_a1111_docstring_examples():
    db = _db(PromptStyle("m", "masterpiece", ""))
    assert extract_styles("1girl, art by greg, masterpiece", "", db) == (["m"], "1girl, art by greg", "")
    wrap = _db(PromptStyle("w", "masterpiece, {prompt}", ""))
    assert extract_styles("masterpiece, 1girl, art by greg", "", wrap) == (["w"], "1girl, art by greg", "")
    assert extract_styles("exquisite, 1girl, art by greg", "", wrap) == ([], "exquisite, 1girl, art by greg", "")


def test_extract_round_trip_in_the_order_applied():
    db = _db(RED, WRAP, PHOTO, EMPTY, PromptStyle("double", "{prompt}, again {prompt}", "bad"))
    for names in (["red"], ["red", "wrap"], ["wrap", "red"], ["Photo", "red"], ["red", "double", "Photo"]):
        prompt, negative = apply_styles("a cat on a mat", "lowres", names, db)
        assert extract_styles(prompt, negative, db) == (names, "a cat on a mat", "lowres"), names


def test_extract_needs_both_texts_and_a_real_match():
    db = _db(PromptStyle("cat", "cat", "dog"))
    assert extract_styles("wild, cat", "dog", db) == (["cat"], "wild", "")
    assert extract_styles("wild, cat", "", db) == ([], "wild, cat", "")  # the negative text is missing
    # A1111 would take 'cat' off 'wildcat' (leaving 'wild'); applying 'cat' to 'wild' gives 'wild, cat'
    assert extract_styles("wildcat", "dog", db) == ([], "wildcat", "dog")
    assert extract_styles("cat", "dog", db) == (["cat"], "", "")  # applied to empty prompts
    # a style with no text is never found (A1111 skips it), so an unstyled prompt gives no names
    assert extract_styles("x", "y", _db(EMPTY)) == ([], "x", "y")


# --------------------------------------------------------------------------------------------- write [save]


def test_write_then_read_round_trip(tmp_path):
    styles = _db(
        PromptStyle("Cinematic", "cinematic still of {prompt}, film grain", "anime, cartoon"),
        PromptStyle("Quotes", 'say "no"', "line one\nline two\r\nthree"),
        PromptStyle(" spaced name", "  leading spaces", "trailing  "),
        PromptStyle("Ünïcode ☕", "東京, {prompt}", ""),
        PromptStyle("Empty", "", ""),
    )
    f = tmp_path / "styles.csv"
    write_styles(f, styles)
    assert read_styles(f) == styles
    assert list(read_styles(f)) == list(styles)
    data = f.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")  # as A1111 writes it
    assert b'\r\nCinematic,"cinematic still of {prompt}, film grain","anime, cartoon"\r\n' in data
    assert sorted(os.listdir(tmp_path)) == ["styles.csv"]  # no temporary file left


def test_write_never_overwrites_unasked(tmp_path):
    f = _write(tmp_path / "styles.csv", "name,prompt\nOld,old\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_styles(f, [PromptStyle("New", "new")])
    assert read_styles(f) == {"Old": PromptStyle("Old", "old")}
    write_styles(f, [PromptStyle("New", "new")], overwrite=True)
    assert read_styles(f) == {"New": PromptStyle("New", "new")}
    assert sorted(os.listdir(tmp_path)) == ["styles.csv"]


@pytest.mark.parametrize(
    "styles, match",
    [
        ([PromptStyle("#hidden", "x")], "comment"),
        ([PromptStyle("", "", "")], "no name and no text"),
        ([PromptStyle("A", "a"), PromptStyle("A", "b")], "twice"),
        ([PromptStyle("A", "a\x00b")], "NUL"),
        ([PromptStyle("A", "x" * 140_000)], "cannot be read back"),
    ],
)
def test_write_refuses_what_would_not_read_back(tmp_path, styles, match):
    with pytest.raises(ValueError, match=match):
        write_styles(tmp_path / "styles.csv", styles)
    assert os.listdir(tmp_path) == []


def test_a_fifo_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "styles.csv"
    os.mkfifo(fifo)
    with pytest.raises(StylesFileError, match="not a regular file"):
        read_styles_file(fifo)
    with pytest.raises(StylesFileError, match="not a file"):
        read_styles(fifo)


def test_cli_style_applies_to_the_prompt_and_hires_prompt(tmp_path, capsys):
    """latentforge txt2img --style NAME --styles-file F: the infotext holds the styled prompts, written
    out by hand from A1111's rules ({prompt} replaced; otherwise appended after ", ")."""
    from PIL import Image

    from latentforge.cli import main
    from latentforge.demo import bundled_model_path

    if bundled_model_path() is None:
        pytest.skip("no bundled demo model")
    csv_path = tmp_path / "styles.csv"
    csv_path.write_text('name,prompt,negative_prompt\nframed,"{prompt}, in a frame",blurry\nink,ink drawing,\n')
    out = tmp_path / "a.png"
    common = ["txt2img", "a cat", "--steps", "1", "-W", "64", "-H", "64", "-o", str(out), "-n", "x"]
    args = [*common, "--style", "ink", "--style", "framed", "--styles-file", str(csv_path)]
    assert main([*args, "--hires", "1.5", "--hires-prompt", "a dog"]) == 0, capsys.readouterr().err
    text = Image.open(out).info["parameters"]
    assert text.startswith("a cat, ink drawing, in a frame\nNegative prompt: x, blurry\n")
    assert 'Hires prompt: "a dog, ink drawing, in a frame"' in text
    out.unlink()
    assert main([*common, "--style", "inkk", "--styles-file", str(csv_path)]) == 2
    assert "unknown style 'inkk'" in capsys.readouterr().err
    assert main([*common, "--style", "ink"]) == 2
    assert "--style needs --styles-file" in capsys.readouterr().err
