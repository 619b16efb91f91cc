"""Textual-inversion embeddings: parity with diffusers' load_textual_inversion (A1111 .pt on SD1, a clip_l /
clip_g pair on SDXL), A1111's chunk and emphasis rules for them, skipped widths, TI hashes, errors."""

from __future__ import annotations

import hashlib

import diffusers as D
import pytest
import torch
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.folders import AdapterNotFound
from latentforge.conditioning.embeddings import EmbeddingError, read_embedding
from tiny import TEXT_WIDTH, build_reference, close, diffusers_sdxl, hf_tokenizer, save_folder


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1emb")
    ref = build_reference("sd1", seed=6)
    ours = latentforge.load(save_folder(ref, tmp / "m"))
    folder = tmp / "embeddings"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, TEXT_WIDTH, generator=g) * 0.02
    # A1111's .pt layout
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "shiny", "step": 100},
               folder / "sub" / "shiny.pt")  # fmt: skip
    ours.folders.embeddings = [folder]
    return ref, ours, folder, vectors, tmp


def _diffusers_sd1(ref, tmp):
    tok = hf_tokenizer("<|endoftext|>", tmp / "dtok")
    return D.StableDiffusionPipeline(
        ref.vae,
        ref.text_encoders[0],
        tok,
        ref.unet,
        D.EulerDiscreteScheduler(),
        None,
        None,
        requires_safety_checker=False,
    )


def test_a1111_pt_matches_diffusers_load_textual_inversion(sd1):
    ref, ours, folder, _, tmp = sd1
    pipe = _diffusers_sd1(ref, tmp)
    pipe.load_textual_inversion(str(folder / "sub" / "shiny.pt"), token="shiny")
    prompt = "a photo of a shiny cat"  # "shiny" is the embedding: 3 vectors
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    ours_ctx = ours.encode_prompt(prompt).context
    ok, diff, scale = close(ours_ctx, theirs)
    assert ok, f"context with embedding: max diff {diff:.3g} vs {scale:.3g}"
    # the embedding changes the encoding (not the ordinary word "shiny")
    ours.folders.embeddings = []
    assert not close(ours.encode_prompt(prompt).context, theirs)[0]
    ours.folders.embeddings = [folder]
    # emphasis applies to the embedding's rows: A1111 multiplies, then restores the mean
    weighted = ours.encode_prompt("a photo of a (shiny:1.4) cat").context
    w = torch.ones(77)
    w[5:8] = 1.4  # start token, a, photo, of, a, then the 3 rows
    expected = theirs * w[None, :, None]
    expected = expected * (theirs.mean() / expected.mean())
    ok, diff, scale = close(weighted, expected)
    assert ok, f"weighted embedding: max diff {diff:.3g} vs {scale:.3g}"


def test_embedding_rows_stay_in_one_chunk(sd1):
    _, ours, *_ = sd1
    tok = ours.tokenizers[0]
    filler = " ".join(["cat"] * 73)
    assert len(tok.encode(filler)) == 73
    both = ours.encode_prompt(f"{filler} shiny").context
    assert both.shape == (1, 154, TEXT_WIDTH)  # 73 + 3 > 75: the 3 rows move to the second chunk whole
    alone = ours.encode_prompt("shiny").context
    torch.testing.assert_close(both[:, 77:], alone)
    torch.testing.assert_close(both[:, :77], ours.encode_prompt(filler).context)


def test_other_formats_and_widths(sd1, tmp_path):
    _, ours, folder, vectors, _ = sd1
    g = torch.Generator().manual_seed(1)
    torch.save({"<tok>": vectors[0]}, tmp_path / "learned_embeds.bin")  # diffusers: {token: vector}
    emb = read_embedding(tmp_path / "learned_embeds.bin")
    assert emb.count == 1 and torch.equal(emb.vectors["*"][0], vectors[0])
    save_file({"emb_params": vectors}, tmp_path / "a1111.safetensors")
    assert torch.equal(read_embedding(tmp_path / "a1111.safetensors").vectors["*"], vectors)
    # another text encoder's width: skipped with a warning naming it, the word stays text
    save_file({"emb_params": torch.randn(2, 64, generator=g)}, folder / "narrow.safetensors")
    try:
        with pytest.warns(UserWarning, match=r"embedding narrow .* skipped"):
            got = ours.encode_prompt("a narrow road").context
        ours.folders.embeddings = []
        torch.testing.assert_close(got, ours.encode_prompt("a narrow road").context)
    finally:
        ours.folders.embeddings = [folder]
        (folder / "narrow.safetensors").unlink()
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(EmbeddingError, match=r"broken\.pt could not be read"):
        read_embedding(tmp_path / "broken.pt")


def test_ti_hashes_in_the_infotext_and_missing_names(sd1):
    _, ours, folder, *_ = sd1
    result = ours.txt2img("a cat", negative_prompt="shiny, blurry", steps=1, width=64, height=64, seed=1)
    digest = hashlib.sha256((folder / "sub" / "shiny.pt").read_bytes()).hexdigest()
    assert f'TI hashes: "shiny: {digest[:12]}"' in result.infotexts[0]
    with pytest.raises(AdapterNotFound, match=r"embedding .shinny.*close names: shiny"):
        ours.txt2img("a cat", networks=[{"name": "shinny", "kind": "embedding"}], steps=1, width=64, height=64)


def test_sdxl_pair_matches_diffusers(tmp_path):
    ref = build_reference("sdxl-base", seed=7)
    ours = latentforge.load(save_folder(ref, tmp_path / "m"))
    g = torch.Generator().manual_seed(2)
    pair = {"clip_l": torch.randn(2, TEXT_WIDTH, generator=g) * 0.02, "clip_g": torch.randn(2, TEXT_WIDTH, generator=g)}
    save_file(pair, tmp_path / "zqglow.safetensors")
    pipe = diffusers_sdxl(ref, D.EulerDiscreteScheduler(), tmp_path)
    pipe.load_textual_inversion(
        pair["clip_l"], token="zqglow", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        pair["clip_g"], token="zqglow", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt("a zqglow lamp", device="cpu", do_classifier_free_guidance=False)
    ours.load_embedding(tmp_path / "zqglow.safetensors")
    got = ours.encode_prompt("a zqglow lamp")
    for name, a, b in (("context", got.context, context), ("pooled", got.pooled, pooled)):
        ok, diff, scale = close(a, b)
        assert ok, f"SDXL {name} with embedding: max diff {diff:.3g} vs {scale:.3g}"
    # a one-encoder embedding does not fit a two-encoder model
    save_file({"emb_params": pair["clip_l"]}, tmp_path / "single.safetensors")
    ours.load_embedding(tmp_path / "single.safetensors")
    with pytest.warns(UserWarning, match="embedding single"):
        ours.encode_prompt("a single lamp")


def test_cli_inspect_tells_an_embedding(sd1, capsys):
    from latentforge.cli import main

    _, _, folder, _, tmp = sd1
    assert main(["inspect", str(folder / "sub" / "shiny.pt"), "-m", str(tmp / "m")]) == 0
    out = capsys.readouterr().out
    assert "textual-inversion embedding 'shiny'" in out and "vectors:     3 (*: width 128)" in out
    assert "(sd1): fits" in out


def test_hostile_embedding_files_are_refused_by_name(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.pt")  # torch.load would block on it forever
    with pytest.raises(EmbeddingError, match=r"pipe\.pt is not a regular file"):
        read_embedding(tmp_path / "pipe.pt")
    cases = {
        "scalar": (torch.tensor(1.0), r"has shape \[\]; an embedding holds vectors"),
        "empty": (torch.zeros(0, 0), r"has shape \[0, 0\]"),
        "ints": (torch.zeros(2, 8, dtype=torch.int64), "is stored as int64"),
        "nan": (torch.full((2, 8), float("nan")), "holds NaN or Inf"),
    }
    for name, (tensor, message) in cases.items():
        save_file({"emb_params": tensor}, tmp_path / f"{name}.safetensors")
        with pytest.raises(EmbeddingError, match=rf"{name}\.safetensors: tensor 'emb_params' {message}"):
            read_embedding(tmp_path / f"{name}.safetensors")
    torch.save({"string_to_param": {"*": torch.tensor(1.0)}}, tmp_path / "a1111.pt")
    with pytest.raises(EmbeddingError, match=r"a1111\.pt: tensor 'string_to_param\.\*' has shape \[\]"):
        read_embedding(tmp_path / "a1111.pt")
    torch.save({1: 2, 3: 4}, tmp_path / "ints.pt")
    with pytest.raises(EmbeddingError, match=r"ints\.pt is not a textual-inversion embedding: .* found 1, 3"):
        read_embedding(tmp_path / "ints.pt")
