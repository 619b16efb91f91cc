"""A1111's embedding images (``.png``/``.webp`` cards): the embedding's JSON in an ``sd-ti-embedding`` text
chunk, or hidden in the pixels. The cards here are written by a writer in this file that follows A1111's
layout (``textual_inversion/image_embedding.py``: zlib JSON, nibble blocks either side of the picture
behind black columns, XOR with its LCG stream); the LCG is checked against the reference values in A1111's
own test of that module."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import latentforge
from latentforge.adapters import folders as F
from latentforge.conditioning.embeddings import EmbeddingError, read_embedding
from latentforge.io import embedding_image as EI
from tiny import TEXT_WIDTH, build_reference, save_folder

# A1111's test: the first 100 values of lcg() (x mod 255), and the sum of the 100000 after them
A1111_LCG_FIRST = [
    253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215, 220, 194, 126, 28,
    240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38, 128, 19, 53, 195, 124, 75, 205,
    12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249, 97, 166, 12, 35, 0, 41, 221, 122, 215, 170, 31, 113,
    186, 97, 119, 31, 23, 185, 66, 140, 30, 41, 37, 63, 137, 109, 216, 55, 159, 145, 82, 204, 86, 73, 222, 44,
    198, 118, 240, 97,
]  # fmt: skip
A1111_LCG_NEXT_100000_SUM = 12731374


def test_lcg_stream_is_a1111s():
    values = EI.lcg_stream(100 + 100_000)
    assert values[:100].tolist() == A1111_LCG_FIRST
    assert int(values[100:].astype(np.int64).sum()) == A1111_LCG_NEXT_100000_SUM


def _json(data: dict) -> str:
    return json.dumps(data, default=lambda t: {"TORCHTENSOR": t.numpy().tolist()})


def _lcg_nibbles(count: int) -> np.ndarray:
    """A1111's generator written out plainly (independent of the module's block jumps)."""
    out, x = [], 0
    for _ in range(count):
        x = (1664525 * x + 1013904223) % 2**32
        out.append((x % 255) & 0x0F)
    return np.array(out, dtype=np.uint8)


def pixel_card(data: dict, picture: np.ndarray, seed: int = 0) -> Image.Image:
    """An embedding card with the data in its pixels, laid out as A1111's ``insert_image_data_embed``."""
    packed = np.frombuffer(zlib.compress(_json(data).encode(), level=9), np.uint8)
    h, d = picture.shape[0], 3
    size = len(packed) + (h - len(packed) % h)
    size += h * d - size % (h * d)
    rng = np.random.default_rng(seed)

    def block(nibbles):
        nibbles = np.resize(nibbles, size).reshape(h, -1, d)
        decoration = rng.integers(1, 16, nibbles.shape, dtype=np.uint8) << 4  # A1111's shaded dots: high bits
        return (nibbles ^ _lcg_nibbles(nibbles.size).reshape(nibbles.shape)) | decoration

    low, high = block(packed & 0x0F), block(packed >> 4)
    canvas = np.zeros((h, low.shape[1] + 1 + picture.shape[1] + 1 + high.shape[1], 3), dtype=np.uint8)
    canvas[:, : low.shape[1]] = low
    canvas[:, low.shape[1] + 1 : low.shape[1] + 1 + picture.shape[1]] = picture
    canvas[:, -high.shape[1] :] = high
    return Image.fromarray(canvas, "RGB")


def text_card(data: dict, picture: np.ndarray) -> tuple[Image.Image, PngInfo]:
    info = PngInfo()
    info.add_text(EI.TEXT_KEY, base64.b64encode(_json(data).encode()).decode())
    return Image.fromarray(picture, "RGB"), info


def _picture(h=48, w=40, seed=1):
    return np.random.default_rng(seed).integers(17, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embimg")
    ours = latentforge.load(save_folder(build_reference("sd1", seed=6), tmp / "m"))
    vectors = torch.randn(3, TEXT_WIDTH, generator=torch.Generator().manual_seed(0)) * 0.02
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "glossy", "step": 100}
    return ours, data, tmp


def _context(pipe, folder, prompt="a photo of a glossy cat"):
    pipe.folders.embeddings = [folder] if folder else []
    return pipe.encode_prompt(prompt).context


@pytest.mark.parametrize("where", ["text chunk", "pixels", "pixels (webp)"])
def test_embedding_card_gives_the_pt_files_vectors(sd1, tmp_path, where):
    pipe, data, _ = sd1
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(data, pt / "glossy.pt")
    cards = tmp_path / "cards"
    cards.mkdir()
    # the file's name is not the embedding's: A1111 takes the name in the data
    if where == "text chunk":
        image, info = text_card(data, _picture())
        image.save(cards / "my card.png", pnginfo=info)
    elif where == "pixels":
        pixel_card(data, _picture()).save(cards / "my card.png")
    else:
        pixel_card(data, _picture()).save(cards / "my card.webp", lossless=True)
    expected = _context(pipe, pt)
    got = _context(pipe, cards)
    assert torch.equal(got, expected)
    assert not torch.equal(_context(pipe, None), expected)  # the embedding changed the encoding
    assert list(F.embedding_files([cards])) == ["glossy"]
    emb = read_embedding(next(cards.iterdir()))
    assert emb.name == "glossy" and torch.equal(emb.vectors["*"], data["string_to_param"]["*"])


def test_previews_and_plain_pictures_are_not_embeddings(sd1, tmp_path):
    pipe, data, _ = sd1
    Image.fromarray(_picture()).save(tmp_path / "glossy.preview.png")  # A1111's preview card of an embedding
    Image.fromarray(_picture(seed=2)).save(tmp_path / "holiday.png")
    torch.save(data, tmp_path / "glossy.pt")
    image, info = text_card({**data, "name": "glossy"}, _picture())
    image.save(tmp_path / "glossy.png", pnginfo=info)  # the same name as the .pt: the tensor file wins
    files = F.embedding_files([tmp_path])
    assert files == {"glossy": tmp_path / "glossy.pt"}
    with pytest.raises(EmbeddingError, match="holds no textual-inversion embedding"):
        read_embedding(tmp_path / "holiday.png")
    # naming the picture by path in a prompt's network list finds the file, and reading it says why not
    assert pipe.folders.find_embedding(str(tmp_path / "holiday.png")) == tmp_path / "holiday.png"


def test_damaged_or_hostile_cards_fail_with_the_file_and_the_fault(sd1, tmp_path, monkeypatch):
    pipe = sd1[0]
    bad_json = PngInfo()
    bad_json.add_text(EI.TEXT_KEY, base64.b64encode(b'{"string_to_param": {"*": ').decode())
    Image.fromarray(_picture()).save(tmp_path / "broken.png", pnginfo=bad_json)
    with pytest.raises(
        EmbeddingError, match=r"broken\.png: the embedding data in the sd-ti-embedding text chunk is not"
    ):
        read_embedding(tmp_path / "broken.png")
    ragged = PngInfo()
    ragged.add_text(
        EI.TEXT_KEY, base64.b64encode(b'{"string_to_param": {"*": {"TORCHTENSOR": [[1, 2], [3]]}}}').decode()
    )
    Image.fromarray(_picture()).save(tmp_path / "ragged.png", pnginfo=ragged)
    with pytest.raises(EmbeddingError, match="rectangular array of numbers"):
        read_embedding(tmp_path / "ragged.png")
    # a damaged card is still listed (by its stem), so that naming it gives its error instead of plain text
    assert F.embedding_files([tmp_path])["broken"] == tmp_path / "broken.png"
    pipe.folders.embeddings = [tmp_path]
    with pytest.raises(EmbeddingError, match=r"broken\.png"):
        pipe.encode_prompt("a broken cat")
    # pixel data that inflates past the limit, and images past the pixel limit, are refused unread
    big = {"string_to_param": {"*": torch.zeros(64, 768)}, "name": "big"}
    pixel_card(big, _picture(h=64)).save(tmp_path / "big.png")
    monkeypatch.setattr(EI, "MAX_JSON_BYTES", 10_000)
    with pytest.raises(EmbeddingError, match="inflates to more than"):
        read_embedding(tmp_path / "big.png")
    monkeypatch.setattr(EI, "MAX_PIXELS", 1000)
    with pytest.raises(EmbeddingError, match="more than an embedding image holds"):
        read_embedding(tmp_path / "big.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(EmbeddingError, match="not a readable PNG or WebP image"):
        read_embedding(tmp_path / "junk.png")

    # a picture of another format named .png is no card: read by no other decoder, and skipped in listings
    Image.fromarray(_picture()).save(tmp_path / "bitmap.png", format="BMP")
    with pytest.raises(EmbeddingError, match=r"bitmap\.png: not a readable PNG or WebP image"):
        read_embedding(tmp_path / "bitmap.png")
    assert {"bitmap", "junk"}.isdisjoint(F.embedding_files([tmp_path]))

    # a header claiming 20000 x 20000 pixels (PIL's decompression-bomb limit): refused before any pixel is read
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    with pytest.raises(EmbeddingError, match=r"bomb\.png: not a readable PNG or WebP image \(Image size"):
        read_embedding(tmp_path / "bomb.png")
