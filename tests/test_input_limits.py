"""Hostile input, case by case: prompt limits, request fields, --from records, init images, outputs.

Expected values are written from the formats' descriptions and A1111's grammar (weights are digits and
dots; ``when`` at or beyond the steps keeps the first text), or computed by hand here.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest
from PIL import Image, PngImagePlugin

from latentforge.cli import main
from latentforge.cli_generate import terminal_safe
from latentforge.conditioning.prompt import (
    MAX_AND_PARTS,
    MAX_CHUNKS,
    MAX_NESTING,
    MAX_PROMPT_CHARS,
    PromptError,
    chunk_prompt,
    parse_attention,
    split_and,
)
from latentforge.conditioning.schedule import MAX_SCHEDULE_TEXTS, prompt_schedule
from latentforge.io.images import save_numbered, save_png
from latentforge.io.writer import atomic_path
from latentforge.pipelines import GenerationRequest, RequestError
from latentforge.pipelines.images import open_image
from latentforge.pipelines.metadata import request_from_image, request_from_infotext


def _png_with_text(path, **texts):
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# ---- prompts


def test_nested_brackets_parse_in_linear_time_at_the_depth_limit():
    # before the parser kept its results, 14 nested "[" took seconds and each one more tripled it
    start = time.perf_counter()
    assert prompt_schedule("[" * MAX_NESTING + "a", 20) == [(20, "[" * MAX_NESTING + "a")]
    assert prompt_schedule("[a:" * MAX_NESTING + "b", 20) == [(20, "[a:" * MAX_NESTING + "b")]
    long = ("[x:" * 25 + "y" + "]" * 25) * (MAX_PROMPT_CHARS // 100)  # backtracks at every "[" and ":"
    prompt_schedule(long[:MAX_PROMPT_CHARS], 1000)
    assert time.perf_counter() - start < 5


def test_network_tags_are_found_in_linear_time_and_as_a1111s_pattern_finds_them():
    # from each "<" with no ">" after it, A1111's pattern scans to the end: 100,000 chars took 27 s, and the
    # server ran it on the prompt before the length check
    import re

    from latentforge.conditioning.prompt import extract_network_tags

    a1111 = re.compile(r"<(\w+):([^>]+)>")  # extra_networks.re_extra_net
    start = time.perf_counter()
    assert extract_network_tags("<a:" * 100_000) == ("<a:" * 100_000, [])
    text, tags = extract_network_tags("<a:" * 100_000 + ">")  # one tag: its text runs to the ">"
    assert text == "" and len(tags) == 1 and tags[0][1] == ["<a"] * 99_999 + [""]
    assert time.perf_counter() - start < 5
    for text in ("x <lora:a:1> y <hypernet:b:0.5>z <lora:c> <d:", "<<lora:a:1>>", "<a:>b<c:d>e<f", "a>b<c"):
        tags = [(m.group(1), m.group(2).split(":")) for m in a1111.finditer(text)]
        assert extract_network_tags(text) == (a1111.sub("", text), tags)


def test_networks_per_request_are_limited():
    from latentforge.pipelines.checks import MAX_NETWORKS

    GenerationRequest.from_dict({"prompt": "<lora:a:0.1>" * MAX_NETWORKS}).validate()
    with pytest.raises(RequestError, match=f"applies {MAX_NETWORKS + 1} networks .*at most {MAX_NETWORKS}"):
        GenerationRequest.from_dict({"prompt": "<lora:a:0.1>" * (MAX_NETWORKS + 1)}).validate()
    with pytest.raises(RequestError, match="at most"):
        networks = [{"name": "b", "kind": "lora"}] * 10
        GenerationRequest.from_dict({"prompt": "<lora:a:1>" * (MAX_NETWORKS - 9), "networks": networks}).validate()


def test_nesting_length_and_option_limits_are_refused_with_the_limit_named():
    with pytest.raises(PromptError, match=f"nests {MAX_NESTING + 1} brackets"):
        prompt_schedule("(" * (MAX_NESTING + 1) + "a", 10)
    with pytest.raises(PromptError, match=f"nests {MAX_NESTING + 1} brackets"):
        parse_attention("[" * (MAX_NESTING + 1))
    # escaped brackets are text and closers pair with openers: 60 pairs in a row are depth 1
    parse_attention("\\(" * 60 + "(a)" * 60)
    with pytest.raises(PromptError, match=f"limit is {MAX_PROMPT_CHARS}"):
        parse_attention("a" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(PromptError, match="prompt-editing/alternation options"):
        prompt_schedule("[a|b]" * 101, 10)  # 202 options
    # [a|b] repeats every 2 steps, [a|b|c] every 3, ...: 2*3*5*7 = 210 different texts over 210 steps
    with pytest.raises(PromptError, match=f"more than {MAX_SCHEDULE_TEXTS} different prompts"):
        prompt_schedule("[a|b][a|b|c][a|b|c|d|e][a|b|c|d|e|f|g]", 210)
    assert len(prompt_schedule("[a|b][a|b|c]", 60)) == 60  # 6 different texts: allowed


def test_when_beyond_any_float_keeps_the_first_text():
    assert prompt_schedule("[a:b:" + "9" * 400 + "]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:" + "9" * 400 + ".5]", 10) == [(10, "a")]


def test_emphasis_weights_are_bounded_and_a1111_number_syntax_kept():
    assert parse_attention("(a:100)") == [("a", 100.0)]
    assert parse_attention("(a:-1)") == [("a", -1.0)]
    # A1111's weight pattern is [+-]?[.\d]+: "1e308" and "nan" are text inside (...) at 1.1
    assert parse_attention("(a:1e308)") == [("a:1e308", 1.1)]
    assert parse_attention("(a:nan)") == [("a:nan", 1.1)]
    for bad, message in (("(a:101)", "outside -100 to 100"), ("(a:1.2.3)", "not a number"), ("(a:.)", "not a number")):
        with pytest.raises(PromptError, match=message):
            parse_attention(bad)
    with pytest.raises(PromptError, match="multiplies to 11000"):
        parse_attention("(((a:100):100):1.1)")


def test_and_parts_are_limited_and_parse_in_linear_time():
    start = time.perf_counter()  # A1111's backtracking pattern takes about 30 s on this
    assert split_and("a " + " " * 9990 + ":" + " " * 9990 + "x") == [("a " + " " * 9990 + ":" + " " * 9990 + "x", 1.0)]
    assert time.perf_counter() - start < 1
    assert split_and("a :1.5 AND b") == [("a", 1.5), (" b", 1.0)]  # leading space kept, as by A1111's pattern
    with pytest.raises(PromptError, match=f"33 parts joined by AND; the limit is {MAX_AND_PARTS}"):
        split_and(" AND ".join(["a"] * 33))
    with pytest.raises(PromptError, match=r"AND part weight 9{20}\.\.\. is outside"):
        split_and("a :" + "9" * 400)
    with pytest.raises(RequestError, match=r"prompt: .*different prompts over the steps; the limit is 100"):
        GenerationRequest(prompt=" AND ".join(["[a|b|c|d|e|f|g|h|i|j|k]"] * 10), steps=30).validate()


def test_chunk_count_is_limited():
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    encode = lambda s: [1] * len(s.split())  # noqa: E731 - one token per word
    assert len(chunk_prompt(words(75 * MAX_CHUNKS), encode, comma_id=0)) == MAX_CHUNKS
    with pytest.raises(PromptError, match=f"longer than {MAX_CHUNKS} chunks"):
        chunk_prompt(words(75 * MAX_CHUNKS + 1), encode, comma_id=0)
    with pytest.raises(PromptError, match=f"longer than {MAX_CHUNKS} chunks"):
        chunk_prompt(" BREAK ".join(["w"] * (MAX_CHUNKS + 1)), encode, comma_id=0)


# ---- requests


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cfg_scale": 1e308}, "cfg_scale must be a finite number from -100 to 100"),
        ({"s_noise": math.inf}, "s_noise must be between 0 and 100"),
        ({"eta": -0.5}, "eta must be between 0 and 10"),
        ({"s_churn": math.nan}, "s_churn must be between 0 and 100"),
        ({"s_tmin": -1}, "s_tmin must be between 0"),
        ({"s_tmax": math.nan}, "s_tmax must be between 0 and inf"),
        ({"aesthetic_score": 1e9}, "aesthetic_score must be between 0 and 10"),
        ({"denoising_strength": 2}, "denoising_strength must be between 0 and 1"),
        ({"steps": "20"}, "steps must be a whole number, got str"),
        ({"steps": True}, "steps must be a whole number, got bool"),
        ({"cfg_scale": "7"}, "cfg_scale must be a number or none, got str"),
        ({"width": 512.0}, "width must be a whole number or none"),
        ({"seed": [1]}, "seed must be a whole number, got list"),
        ({"sampler": 3}, "sampler must be text"),
        ({"sgm_noise_multiplier": "yes"}, "sgm_noise_multiplier must be true or false"),
        ({"prompt": {"a": 1}}, "prompt must be text"),
        ({"hires": [1]}, "hires must be a group of options"),
        ({"hires": {"scale": "2"}}, "hires.scale must be a number"),
        ({"networks": "lora"}, "networks must be a list"),
        ({"enable_hr": "false"}, "enable_hr must be true or false"),
        ({"extra": []}, "extra must be a mapping"),
        ({"prompt": "(a:500)"}, "prompt: emphasis weight 500"),
        ({"negative_prompt": "[" * 99}, "negative_prompt nests 99 brackets"),
        ({"prompt": "a \udcff b"}, "prompt is not valid text: character 2"),
        ({"negative_prompt": "\udcc3"}, "negative_prompt is not valid text"),
        ({"networks": [{"name": "x", "strength": math.nan}]}, "strength must be a finite number from -100 to 100"),
        ({"networks": [{"name": "x", "text_strength": 1e308}]}, "text_strength must be a finite number"),
        ({"prompt": "x <lora:demo_star:1e308>"}, "prompt: <lora:demo_star>: strength must be a finite number"),
        ({"prompt": "x <lora:demo_star:nan>"}, "prompt: <lora:demo_star>: strength must be a finite number"),
    ],
)
def test_bad_request_fields_are_request_errors_naming_the_field(fields, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        GenerationRequest.from_dict({"steps": 4, **fields}).validate()


def test_request_that_is_not_a_mapping():
    for data in ([1, 2], "x", None, {1: 2}):
        with pytest.raises(RequestError, match="must be a mapping of field names"):
            GenerationRequest.from_dict(data)


# ---- --from records


@pytest.mark.parametrize(
    "text, message",
    [
        ("x\nSteps: abc, Sampler: Euler, Seed: 1", "Steps 'abc' is not a whole number"),
        ("x\nSteps: 3, Size: 1x, Seed: 1", "Size '1x' is not a size"),
        ("x\nSteps: 3, Size: 64x64x64, Seed: 1", "Size '64x64x64' is not a size"),
        ("x\nSteps: 3, Seed: " + "9" * 5000 + ", CFG scale: 7", "Seed '999"),
        ("x\nSteps: 3, CFG scale: 1e999, Seed: 1", "cfg_scale must be a finite number"),
        ("x\nSteps: 99999999, CFG scale: 7, Seed: 1", "steps must be at most 1000"),
        ("x\nSteps: 3, Hires upscale: big, Seed: 1", "Hires upscale 'big' is not a number"),
        ("x\nSteps: 3, Variation seed: v, Seed: 1", "Variation seed 'v' is not a whole number"),
        ("x\nSteps: 3, Seed resize from: 64x, Seed: 1", "Seed resize from '64x' is not a size"),
        ("x\nSteps: 3, ENSD: -, Seed: 1", "ENSD '-' is not a whole number"),
        ("x\nSteps: 3, Mask blur: 4xq, Denoising strength: 0.5", "Mask blur '4xq' is not a number or XxY"),
        ('x\nSteps: 3, Outpaint: "8,8", Seed: 1', "Outpaint '8,8' is not four whole numbers"),
        ("x\nSteps: 3, Mask blur: 1e300, Denoising strength: 0.5", "mask_blur must be between 0 and 256"),
    ],
)
def test_malformed_infotext_values_name_the_field(text, message):
    with pytest.raises(RequestError, match=message):
        req, meta = request_from_infotext(text)
        req.validate(img2img=meta["mode"] == "img2img")


def _record(**changes):
    record = {"latentforge": 1, "mode": "txt2img", "batch_index": 0, "request": {"prompt": "p", "batch_size": 2}}
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize(
    "text, message",
    [
        (_record(batch_index=99), "batch_index must be a whole number from 0 to batch_size - 1 \\(2\\), got 99"),
        (_record(batch_index="0"), "batch_index must be"),
        (_record(mode="inpaint"), "mode must be 'txt2img', 'img2img' or 'upscale-x4'"),
        (_record(request=[1]), "request must be a JSON object"),
        (_record(request={"steps": "many"}), "steps must be a whole number"),
        (_record(request={"stpes": 3}), "unknown request field"),
        (_record(latentforge=7), "version 7 is not 1"),
        (_record(model="m"), "model must be a JSON object"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ],
)
def test_hostile_records_are_refused_whole_before_generation(tmp_path, text, message):
    png = _png_with_text(tmp_path / "r.png", latentforge=text)
    with pytest.raises(RequestError, match=message):
        request_from_image(png)


def test_from_refuses_a_record_of_the_other_mode_before_loading(tmp_path, capsys):
    png = _png_with_text(tmp_path / "r.png", latentforge=_record(mode="img2img"))
    assert main(["txt2img", "--from", str(png), "-m", str(tmp_path / "none"), "--outdir", str(tmp_path)]) == 2
    assert "was made by img2img; use `latentforge img2img INIT_IMAGE --from`" in capsys.readouterr().err


def test_comfy_graphs_linking_every_node_twice_are_read_in_linear_time(tmp_path):
    # each node links to the next twice: following every link without remembering visited nodes takes
    # 2^40 steps (2.3 s at 20 nodes before the fix, 4x per two more)
    graph = {str(i): {"class_type": "X", "inputs": {"a": [str(i + 1), 0], "b": [str(i + 1), 0]}} for i in range(40)}
    graph["s"] = {"class_type": "KSampler", "inputs": {"latent_image": ["0", 0], "seed": 1, "steps": 3}}
    png = _png_with_text(tmp_path / "c.png", prompt=json.dumps(graph))
    start = time.perf_counter()
    req, _ = request_from_image(png)
    assert req.steps == 3 and time.perf_counter() - start < 1
    graph["s"]["inputs"] = "not a mapping"
    with pytest.raises(RequestError, match="ComfyUI graph"):
        request_from_image(_png_with_text(tmp_path / "d.png", prompt=json.dumps(graph)))


# ---- images in


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels in about 50 KB
    assert bomb.stat().st_size < 200_000
    with pytest.raises(RequestError, match=r"decompression bomb .*images of more than 67108864 pixels"):
        open_image(bomb)
    with pytest.raises(RequestError, match=r"^mask .*decompression bomb"):
        open_image(bomb, what="mask")
    big = tmp_path / "big.png"
    Image.new("1", (9000, 7500)).save(big)  # under PIL's own limit, over ours (8192 x 8192)
    with pytest.raises(RequestError, match="is 9000x7500 pixels; images of more than 67108864 pixels"):
        open_image(big)


def test_sixteen_bit_grey_images_keep_their_levels(tmp_path):
    import numpy as np

    for level in (1000, 20000, 40000):
        Image.fromarray(np.full((8, 8), level, np.uint16)).save(tmp_path / "g16.png")
        image = open_image(tmp_path / "g16.png")
        assert image.mode == "L" and image.getpixel((0, 0)) == round(level / 257)
    assert open_image(tmp_path / "g16.png", keep_depth=True).getpixel((0, 0)) == 40000  # depth maps


def _levels(image) -> list:
    return list(image.getdata())[:8]


def test_float_tiffs_are_scaled_from_0_to_1(tmp_path):
    """A 32-bit float TIFF (mode F) went through PIL's own conversion, which clips at 0-255: every
    value of [0, 1] became level 0 or 1, a black image."""
    import numpy as np

    from latentforge.pipelines.images import prepare_image

    values = np.array([[0.0, 0.2, 0.6, 1.0, 1.5, -0.5, np.inf, -np.inf]] * 4, np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    image = open_image(tmp_path / "f.tif")
    # 0.2 * 255 = 51, 0.6 * 255 = 153; beyond [0, 1] (infinities too) clipped
    assert image.mode == "L" and _levels(image) == [0, 51, 153, 255, 255, 0, 255, 0]
    init = prepare_image(image, 8, 4, 0)  # what generation encodes
    assert np.asarray(init.convert("RGB"))[0, :, 0].tolist() == [0, 51, 153, 255, 255, 0, 255, 0]
    # a PIL image given directly (the library, the server) gets the same rule
    assert _levels(open_image(Image.fromarray(values, mode="F"))) == [0, 51, 153, 255, 255, 0, 255, 0]
    assert open_image(tmp_path / "f.tif", keep_depth=True).mode == "F"  # depth maps keep their values


def test_float_images_with_nan_are_refused_by_name(tmp_path, capsys):
    import numpy as np

    values = np.full((8, 8), 0.5, np.float32)
    values[2, 3] = values[5, 5] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    for what in ("init image", "mask"):
        with pytest.raises(RequestError, match=rf"^{what} .*nan.tif is a floating-point image with 2 NaN pixels"):
            open_image(tmp_path / "nan.tif", what)
    args = ["img2img", str(tmp_path / "nan.tif"), "x", "-m", str(tmp_path / "no-model"), "-o", str(tmp_path / "o.png")]
    assert main(args) == 2  # found before the model is loaded
    err = capsys.readouterr().err
    assert "nan.tif is a floating-point image with 2 NaN pixels" in err and "no-model" not in err
    assert "Traceback" not in err


def test_32_bit_integer_images_use_16_bit_levels_or_are_refused(tmp_path):
    import numpy as np

    values = np.array([[0, 1000, 20000, 40000, 65535, 128, 129, 385]] * 4, np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
    image = open_image(tmp_path / "i.tif")
    # round(v / 257): 1000 -> 3.89 -> 4, 20000 -> 77.8 -> 78, 40000 -> 155.6 -> 156, 128 -> 0.498 -> 0
    assert image.mode == "L" and _levels(image) == [0, 4, 78, 156, 255, 0, 1, 1]
    for bad, shown in ((70000, "0 to 70000"), (-1, "-1 to 65535")):
        values[0, 0] = bad
        Image.fromarray(values, mode="I").save(tmp_path / "bad.tif")
        with pytest.raises(RequestError, match=f"32-bit integer image with values from {shown}; only 0 to 65535"):
            open_image(tmp_path / "bad.tif")


def test_an_init_image_of_another_type_is_named_briefly():
    import numpy as np

    with pytest.raises(RequestError, match=r"^init image must be a PIL image or a file path, got ndarray$"):
        open_image(np.zeros((512, 512, 3), np.uint8))


def test_invalid_utf8_prompt_from_argv_is_refused_before_loading(tmp_path, capsys):
    prompt = b"\xff\xfe abc".decode("utf-8", "surrogateescape")  # as Python reads such bytes from argv
    assert main(["txt2img", prompt, "--steps", "1", "-q", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "prompt is not valid text" in err and "UTF-8" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_mask_is_found_before_loading_the_model(tmp_path, capsys):
    init = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(init)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    missing_model = str(tmp_path / "no-model")  # loading would fail: the mask must be checked first
    for mask in (tmp_path / "junk.png", tmp_path / "absent.png"):
        args = ["img2img", str(init), "x", "-m", missing_model, "--mask", str(mask), "-o", str(tmp_path / "o.png")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"mask {mask}" in err and "no-model" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "junk.png"]


def test_output_size_from_an_init_image_obeys_the_size_limits(tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (8500, 64)).save(wide)
    code = main(["img2img", str(wide), "x", "-m", str(tmp_path / "none"), "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "output size 8496x64 taken from the init image (8500x64)" in err and "--width" in err


# ---- outputs


def test_unwritable_output_location_is_found_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    missing_model = str(tmp_path / "no-model")  # loading would fail: the folder must be checked first
    assert main(["txt2img", "x", "-m", missing_model, "--outdir", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert main(["txt2img", "x", "-m", missing_model, "-o", str(tmp_path / "file" / "a.png")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    (tmp_path / "d.png").mkdir()
    assert main(["txt2img", "x", "-m", missing_model, "-o", str(tmp_path / "d.png"), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png")
        numbered = save_numbered(Image.new("RGB", (8, 8)), tmp_path, 5)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert numbered.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "a.png"
    with pytest.raises(FileExistsError, match="appeared while writing"), atomic_path(target) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another process took the name meanwhile
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["a.png"]


def test_concurrent_writers_get_distinct_numbers(tmp_path, monkeypatch):
    import latentforge.io.images as images

    scan = images.next_free_names

    def slow_scan(folder, seeds, *rest):  # widen the window between choosing a number and taking it
        names = scan(folder, seeds, *rest)
        time.sleep(0.005)
        return names

    monkeypatch.setattr(images, "next_free_names", slow_scan)

    def worker(seed):
        for _ in range(5):
            save_numbered(Image.new("RGB", (8, 8)), tmp_path, seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (7, 7, 7, 8, 9, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 30  # none lost, even with the same seed (same name but for the number)
    assert sorted(int(n[:5]) for n in names) == list(range(30))  # each number claimed once


# ---- terminal output


def test_terminal_safe_escapes_controls_but_keeps_text():
    assert terminal_safe("a\x1b[2Jb\tc\nd\x07\x9b\u202eé") == "a\\x1b[2Jb\tc\nd\\x07\\x9b\\u202eé"
    assert terminal_safe("a\nb\r", newlines=False) == "a\\nb\\x0d"


def test_info_prints_no_escape_sequences(tmp_path, capsys):
    png = _png_with_text(tmp_path / "e.png", parameters="hi \x1b]0;owned\x07\x1b[2J\nSteps: 3, Sampler: Euler, Seed: 1")
    assert main(["info", str(png)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "hi \\x1b]0;owned\\x07\\x1b[2J" in out


def test_transparent_init_images_show_a1111s_white_background(tmp_path):
    """A1111 flattens an RGBA init image onto img2img_background_color (#ffffff) before encoding it;
    convert("RGB") dropped the alpha, so a transparent black image was encoded as black."""
    import numpy as np

    from latentforge.pipelines.images import prepare_image

    clear = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    assert np.asarray(prepare_image(clear, 8, 4, 0)).tolist() == np.full((4, 8, 3), 255).tolist()
    half = Image.new("RGBA", (8, 4), (255, 0, 0, 128))  # red at alpha 128 over white: 255, 127, 127
    assert np.asarray(prepare_image(half, 8, 4, 0))[0, 0].tolist() == [255, 127, 127]
    solid = Image.new("RGBA", (8, 4), (10, 20, 30, 255))
    assert np.asarray(prepare_image(solid, 8, 4, 0))[0, 0].tolist() == [10, 20, 30]
