"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with the vocabulary bundled in the package.

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, see ``assets/``) or a diffusers
folder's ``vocab.json`` + ``merges.txt``. Text cleaning follows the tools users run (see ``clean_text``).
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex

from latentforge.io.tensorfile import CheckpointError, short

START_TOKEN = 49406
END_TOKEN = 49407
CONTEXT_LENGTH = 77

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2 style byte-level BPE.

    Insertion order matters: the vocabulary lists these characters in this order (printable bytes
    first, then the others, which map to chr(256 + n)).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str, mode: str = "openai") -> str:
    """Normalise a prompt before splitting.

    ``"openai"`` (default): what OpenAI's CLIP and open_clip tokenizers do, and what the A1111 web UI
    gets (its environment has ftfy): ``ftfy.fix_text`` (mojibake, curly quotes, full-width forms, NFC),
    HTML-unescape twice, collapse whitespace, strip, lower-case.
    ``"transformers"``: what transformers >= 5 ``CLIPTokenizer`` does: NFC, collapse whitespace,
    lower-case. The two differ only on text that ftfy or HTML unescaping changes.
    """
    if mode == "openai":
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    elif mode == "transformers":
        text = unicodedata.normalize("NFC", text)
    else:
        raise ValueError(f"unknown text cleaning mode {mode!r}; use 'openai' or 'transformers'")
    return _WHITESPACE.sub(" ", text).strip().lower()


def _bundled_merges() -> list[tuple[str, str]]:
    with resources.files("latentforge.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    # line 0 is a header; the vocabulary uses the first 49152 - 256 - 2 merges
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # type: ignore[misc]


def _vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(_SPECIAL)
    return {t: i for i, t in enumerate(tokens)}


class CLIPTokenizer:
    """Text -> token ids for a CLIP text encoder.

    ``encode(text)`` gives the BPE ids without framing; calling the tokenizer frames each text as
    ``[start] + ids + [end]``, truncated to 77 with the end token kept last, padded with ``pad_id``
    (49407 for OpenAI CLIP-L, 0 for OpenCLIP encoders).
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        *,
        pad_id: int = END_TOKEN,
        cleaning: str = "openai",
    ):
        if merges is None:
            merges = _bundled_merges()
        if vocab is None:
            vocab = _vocab_from_merges(merges)
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pad_id = pad_id
        self.cleaning = cleaning
        self.start_id = vocab["<|startoftext|>"]
        self.end_id = vocab["<|endoftext|>"]
        self._cache: dict[str, list[int]] = {s: [vocab[s]] for s in _SPECIAL}
        clean_text("", cleaning)  # validate the mode early

    @classmethod
    def from_folder(cls, folder: str | Path, *, pad_id: int | None = None, cleaning: str = "openai") -> CLIPTokenizer:
        """Read a diffusers/transformers tokenizer folder (``vocab.json`` + ``merges.txt``)."""
        folder = Path(folder)
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{folder}: cannot read the tokenizer files ({short(str(e), 160)})") from None
        if (
            not isinstance(vocab, dict)
            or not all(type(i) is int and 0 <= i < 2**31 for i in vocab.values())
            or not {"<|startoftext|>", "<|endoftext|>"} <= vocab.keys()
        ):
            raise CheckpointError(
                f"{folder / 'vocab.json'} is not a CLIP vocabulary: it must map tokens (with <|startoftext|> and "
                "<|endoftext|>) to non-negative integer ids"
            )
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            bad = next(i for i, m in enumerate(merges) if len(m) != 2)
            raise CheckpointError(f"{folder / 'merges.txt'}: merge {bad + 1} is not two tokens; the file is damaged")
        if pad_id is None:
            pad_id = END_TOKEN
            config = folder / "special_tokens_map.json"
            if config.exists():
                pad = json.loads(config.read_text(encoding="utf-8")).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                if isinstance(pad, str) and pad in vocab:
                    pad_id = vocab[pad]
        return cls(vocab, merges, pad_id=pad_id, cleaning=cleaning)  # type: ignore[arg-type]

    def _bpe(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            best = min(range(len(word) - 1), key=lambda i: self.ranks.get((word[i], word[i + 1]), 1 << 30))
            pair = (word[best], word[best + 1])
            if pair not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == pair[0] and word[i + 1] == pair[1]:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[w] for w in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without start/end tokens or padding."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text, self.cleaning)):
            if piece in _SPECIAL:
                ids.extend(self._bpe(piece))
            else:
                ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if i in (self.start_id, self.end_id):
                continue
            token = self.decoder[i]
            word_end = token.endswith("</w>")
            out.extend(self.byte_decoder[c] for c in (token[:-4] if word_end else token))
            if word_end:
                out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()

    def frame(self, ids: list[int], length: int = CONTEXT_LENGTH) -> list[int]:
        """``[start] + ids + [end]`` truncated to ``length`` (end kept last) and padded with pad_id."""
        body = ids[: length - 2]
        framed = [self.start_id, *body, self.end_id]
        return framed + [self.pad_id] * (length - len(framed))

    def __call__(self, texts: str | list[str], length: int = CONTEXT_LENGTH):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.frame(self.encode(t), length) for t in texts], dtype=torch.long)
