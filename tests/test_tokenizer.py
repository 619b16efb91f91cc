"""The CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary files."""

from __future__ import annotations

import gzip
import hashlib
import random
from importlib import resources

import pytest

from latentforge.models.tokenizer import CLIPTokenizer, clean_text
from tiny import hf_tokenizer

WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "astronaut",
    "riding",
    "horse",
    "masterpiece",
    "best quality",
    "4k",
    "highly detailed",
    "octane render",
    "trending on artstation",
    "portrait",
    "Greg Rutkowski",
    "don't",
    "it's",
    "we're",
    "they've",
    "I'm",
    "you'll",
    "he'd",
    "CAPS",
    "MiXeD",
    "x2",
    "1girl",
]
SYMBOLS = [
    ",",
    ".",
    "!",
    "?",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ":",
    ";",
    "|",
    "<lora:detail:0.8>",
    "--",
    "...",
    "&",
    "#",
    "@",
    "$",
    "%",
    "^",
    "*",
    "_",
    "+",
    "=",
    "~",
    "`",
    "'",
    '"',
    "/",
    "\\",
    "(word:1.3)",
    "\t",
    "\n",
]
UNICODE = [
    "café",
    "naïve",
    "Straße",
    "über",
    "日本語",
    "猫が好き",
    "Привет мир",
    "مرحبا",
    "שלום",
    "ελληνικά",
    "한국어",
    "🐱",
    "🚀✨",
    "👩‍🚀",
    "🏳️‍🌈",
    "½",
    "²",
    "Ⅻ",
    "ﬁ",
    "\u00a0",
    "e\u0301",
    "Å",
    "ß",
]


def _prompts(n: int = 320) -> list[str]:
    rng = random.Random(1234)
    out = [
        "",
        " ",
        "a photo of a cat",
        "Hello, world!",
        "1234567890",
        "a" * 300,
        "word " * 120,
        "<|startoftext|>",
        "a <|endoftext|> b",
        "   leading and trailing   ",
        "UPPER lower",
    ]
    pools = [WORDS, SYMBOLS, UNICODE, [str(rng.randint(0, 10**6)) for _ in range(20)]]
    while len(out) < n:
        k = rng.randint(1, 40)
        parts = [rng.choice(rng.choice(pools)) for _ in range(k)]
        sep = rng.choice([" ", "", ", ", "  "])
        out.append(sep.join(parts))
    return out


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_tokenizer("<|endoftext|>", tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_pad0(tmp_path_factory):
    return hf_tokenizer("!", tmp_path_factory.mktemp("tok0"))


def test_bundled_vocabulary_is_the_openai_file():
    data = resources.files("latentforge.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert len(data) == 1_356_917
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert gzip.decompress(data).decode().split("\n")[0].startswith('"bpe_simple_vocab_16e6.txt#version')
    assert resources.files("latentforge.assets").joinpath("bpe_simple_vocab_16e6.LICENSE").is_file()


def test_check_values_from_reference_notes():
    tok = CLIPTokenizer()
    assert len(tok.encoder) == 49408
    assert tok("a photo of a cat")[0][:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Hello, world!")[0][:6].tolist() == [49406, 3306, 267, 1002, 256, 49407]
    assert len(tok.encode("2024")) == 4  # digits are one token each


def test_ids_match_transformers_on_varied_prompts(hf):
    tok = CLIPTokenizer(cleaning="transformers")
    mismatches = [p for p in PROMPTS if tok.encode(p) != hf(p, add_special_tokens=False).input_ids]
    assert not mismatches, f"{len(mismatches)} of {len(PROMPTS)} differ, e.g. {mismatches[:3]!r}"


def test_default_cleaning_matches_transformers_where_ftfy_changes_nothing(hf):
    tok = CLIPTokenizer()
    same = [p for p in PROMPTS if clean_text(p, "openai") == clean_text(p, "transformers")]
    assert len(same) > 250
    bad = [p for p in same if tok.encode(p) != hf(p, add_special_tokens=False).input_ids]
    assert not bad, bad[:3]


@pytest.mark.parametrize("pad_id, fixture", [(49407, "hf"), (0, "hf_pad0")])
def test_framing_truncation_and_padding(request, pad_id, fixture):
    ref = request.getfixturevalue(fixture)
    tok = CLIPTokenizer(pad_id=pad_id, cleaning="transformers")
    # with pad token "!" transformers also turns a literal "!" into the pad token: see the test below
    prompts = PROMPTS if pad_id == 49407 else [p for p in PROMPTS if "!" not in p]
    ours = tok(prompts).tolist()
    theirs = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours == theirs
    long = tok("word " * 120)[0].tolist()
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407  # end token kept last
    short = tok("cat")[0].tolist()
    assert short[:3] == [49406, 2368, 49407] and set(short[3:]) == {pad_id}


@pytest.mark.parametrize(
    "text, plain",
    [
        ("a \u201ccat\u201d in a hat", 'a "cat" in a hat'),  # curly quotes uncurled by ftfy
        ("ｆｕｌｌｗｉｄｔｈ letters", "fullwidth letters"),  # full-width forms folded by ftfy
        ("salt &amp; pepper", "salt & pepper"),  # HTML entity unescaped
        ("cafÃ© mojibake", "café mojibake"),  # UTF-8 read as Latin-1, repaired by ftfy
    ],
)
def test_edge_cases_follow_the_original_cleaning(hf, text, plain):
    """Where ftfy/HTML unescaping changes a prompt, the default follows OpenAI CLIP / open_clip / A1111:
    the ids are those of the repaired text; transformers >= 5 tokenizes the raw text."""
    ours = CLIPTokenizer().encode(text)
    assert ours == hf(plain, add_special_tokens=False).input_ids
    raw = CLIPTokenizer(cleaning="transformers").encode(text)
    assert raw == hf(text, add_special_tokens=False).input_ids
    assert raw != ours


def test_exclamation_mark_with_openclip_padding(hf, hf_pad0):
    """diffusers' SD2 / SDXL tokenizer_2 declares "!" (id 0) as its pad token, and transformers then
    matches a literal "!" in the prompt as that special token. The original OpenCLIP tokenizer (SGM,
    A1111, ComfyUI) encodes it as the word-final "!</w>" (256); latentforge follows the original."""
    (wow,) = hf("wow", add_special_tokens=False).input_ids
    ours = CLIPTokenizer(pad_id=0).encode("wow!")
    assert ours == CLIPTokenizer().encode("wow!") == [wow, 256]  # "!</w>" = 256 per the reference notes
    assert hf_pad0("wow!", add_special_tokens=False).input_ids == [wow, 0]


def test_decode_round_trip():
    tok = CLIPTokenizer()
    assert tok.decode(tok.encode("A photo of a cat, 4k!")) == "a photo of a cat , 4 k !"


def test_reads_a_diffusers_tokenizer_folder(tmp_path):
    from tiny import write_tokenizer_files

    write_tokenizer_files(tmp_path / "tokenizer", "!")
    tok = CLIPTokenizer.from_folder(tmp_path / "tokenizer")
    assert tok.pad_id == 0
    assert tok("a photo of a cat")[0][:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


def test_unknown_cleaning_mode_is_refused():
    with pytest.raises(ValueError, match="cleaning mode"):
        CLIPTokenizer(cleaning="nope")
