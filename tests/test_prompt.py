"""A1111 prompt syntax: emphasis, BREAK, chunking, and weighted encoding."""

from __future__ import annotations

import pytest
import torch

import latentforge
from latentforge.conditioning import chunk_prompt, parse_attention
from tiny import build_reference, save_folder


@pytest.mark.parametrize(
    "text, expected",
    [  # the first three are the examples of the A1111 syntax in the reference notes
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
        ("[faded]", [("faded", 1 / 1.1)]),
        ("((double))", [("double", 1.1 * 1.1)]),
        ("((nested:1.5))", [("nested", 1.5 * 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("", [("", 1.0)]),
        ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ],
)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_chunks_of_75_and_comma_backtrack(tok):
    comma = tok.encode(",")[0]
    words = " ".join(f"w{i}" for i in range(60))  # "w12" is two tokens: w, 12 (digits split) -> more than 75
    chunks = chunk_prompt(words, tok.encode, comma)
    assert len(chunks) >= 2 and all(len(c.tokens) <= 75 for c in chunks)
    assert sum(len(c.tokens) for c in chunks) == len(tok.encode(words))
    # a comma within the last 20 tokens of a full chunk moves the rest of that phrase to the next chunk
    text = "cat " * 70 + ", a small red circle " + "dog " * 10
    chunks = chunk_prompt(text, tok.encode, comma)
    assert chunks[0].tokens[-1] == comma and len(chunks[0].tokens) == 71
    assert chunks[1].tokens[:4] == tok.encode("a small red circle")


def test_break_starts_a_new_chunk_and_empty_prompt_has_one(tok):
    comma = tok.encode(",")[0]
    chunks = chunk_prompt("a cat BREAK a dog", tok.encode, comma)
    assert [c.tokens for c in chunks] == [tok.encode("a cat"), tok.encode("a dog")]
    assert [c.tokens for c in chunk_prompt("", tok.encode, comma)] == [[]]
    plain = chunk_prompt("word " * 100, tok.encode, comma, "plain")
    assert len(plain) == 1 and len(plain[0].tokens) == 75


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return latentforge.load(save_folder(build_reference("sd1", 2), tmp_path_factory.mktemp("p") / "m"))


def test_weighted_encoding_rescales_to_the_original_mean(pipe):
    plain = pipe.encode_prompt("a red circle on a blue background").context
    weighted = pipe.encode_prompt("a (red circle:1.5) on a blue background").context
    assert weighted.shape == plain.shape == (1, 77, 128)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    ids = pipe.tokenizers[0].encode("a red circle")  # tokens 1..3 of the chunk are "a red circle"
    ratio = weighted[0, 2:4] / plain[0, 2:4]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), rtol=1e-4, atol=1e-4)
    assert len(ids) == 3 and float(ratio[0, 0]) > 1.3
    unweighted = pipe.encode_prompt("a red circle on a blue background", syntax="plain").context
    assert torch.equal(plain, unweighted)  # no emphasis: identical to plain encoding


def test_long_prompts_are_encoded_in_chunks(pipe):
    long = ", ".join(["a detailed painting of a lighthouse"] * 20)
    emb = pipe.encode_prompt([long, "short"])
    assert emb.context.shape[1] % 77 == 0 and emb.context.shape[1] >= 154
    first = pipe.encode_prompt(long).context[:, :77]
    torch.testing.assert_close(emb.context[:1, :77], first)
