"""ControlNet (Zhang et al. 2023): our network and loaders against diffusers' ControlNetModel on tiny
random-weight models, the unit rules (weight, guidance range, soft weights) from their definitions."""

from __future__ import annotations

import re

import cv2
import diffusers as D
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.controlnet import ActiveUnit, ControlledDenoiser, load_controlnet, round_trip_ok
from latentforge.convert.diffusers import unet_config_from_diffusers
from latentforge.io.tensorfile import CheckpointError
from latentforge.models.controlnet import ControlNetConfig
from latentforge.models.unet import ControlResiduals, UNetConfig
from latentforge.pipelines.control import canny, fit
from latentforge.pipelines.request import RequestError
from latentforge.sampling.denoisers import Cond
from tiny import build_reference, close, hf_tokenizer, perturb, save_folder


@pytest.fixture(scope="module")
def reference():
    ref = build_reference("sd1")
    net = perturb(ControlNetModel.from_unet(ref.unet), 7)
    return ref, net


def _original_layout(net: ControlNetModel, levels: int, n: int) -> dict[str, torch.Tensor]:
    """The original ``control_model.*`` names written from the layout's description (test-only)."""
    out = {}
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    hint_blocks = len(net.controlnet_cond_embedding.blocks)
    for k, v in net.state_dict().items():
        name = k
        if k.startswith("time_embedding.linear_"):
            name = "time_embed." + ("0" if "linear_1" in k else "2") + k[len("time_embedding.linear_1") :]
        elif k.startswith("conv_in."):
            name = "input_blocks.0.0." + k[len("conv_in.") :]
        elif k.startswith("controlnet_cond_embedding.conv_in."):
            name = "input_hint_block.0." + k.rsplit(".", 1)[1]
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            name = f"input_hint_block.{2 * (hint_blocks + 1)}." + k.rsplit(".", 1)[1]
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)$", k):
            name = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(\w+)$", k):
            name = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        elif m := re.match(r"controlnet_mid_block\.(\w+)$", k):
            name = f"middle_block_out.0.{m.group(1)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(\w+)\.(.+)$", k):
            level, kind, j, first, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), m.group(5)
            block = 1 + level * (n + 1) + (n if kind == "downsamplers" else j)
            if kind == "downsamplers":
                name = f"input_blocks.{block}.0.op.{rest}"
            elif kind == "resnets":
                name = f"input_blocks.{block}.0.{resnet[first]}.{rest}"
            else:
                name = f"input_blocks.{block}.1.{first}.{rest}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(\w+)\.(.+)$", k):
            kind, j, first, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            if kind == "attentions":
                name = f"middle_block.1.{first}.{rest}"
            else:
                name = f"middle_block.{2 * j}.{resnet[first]}.{rest}"
        else:
            raise AssertionError(f"test converter has no rule for {k}")
        out["control_model." + name] = v.contiguous()
    return out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([500.0, 123.0])
    return x, t, ctx, hint


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_residuals_equal_diffusers(reference, tmp_path, layout):
    ref, net = reference
    target = unet_config_from_diffusers(dict(ref.unet.config))
    path = tmp_path / "cn.safetensors"
    if layout == "diffusers":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        save_file(_original_layout(net, 4, 2), str(path))
    ours = load_controlnet(path, target)
    assert round_trip_ok(ours)
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        down, mid = net(x, t, ctx, hint, return_dict=False)
        res = ours(x, t, ctx, hint)
    assert len(res.output) == len(down) == 12
    for a, b in zip(res.output, down):
        ok, diff, scale = close(a, b)
        assert ok, (diff, scale)
    ok, diff, scale = close(res.middle, mid)
    assert ok, (diff, scale)


# --- end to end against StableDiffusionControlNetPipeline ----------------------------------------------

PROMPT, NEGATIVE = "a photo of a red cube on a wooden table", "blurry, low quality"


def _control_image(size: int = 64) -> Image.Image:
    g = np.random.default_rng(3)
    arr = (g.random((size, size, 3)) * 255).astype(np.uint8)
    arr[16:48, 16:48] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, reference):
    tmp = tmp_path_factory.mktemp("cn_e2e")
    ref, net = reference
    path = tmp / "control_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ours = latentforge.load(save_folder(ref, tmp / "m"))
    return ref, net, ours, path, hf_tokenizer("<|endoftext|>", tmp)


def test_txt2img_matches_controlnet_pipeline(e2e):
    ref, net, ours, path, tok = e2e
    sched = D.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace"
    )
    pipe = D.StableDiffusionControlNetPipeline(
        ref.vae, ref.text_encoders[0], tok, ref.unet, net, sched, None, None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = _control_image()
    theirs = pipe(
        PROMPT,
        image=image,
        negative_prompt=NEGATIVE,
        num_inference_steps=8,
        guidance_scale=7.0,
        height=64,
        width=64,
        controlnet_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(99),
        output_type="np",
    ).images
    request = dict(negative_prompt=NEGATIVE, steps=8, cfg_scale=7.0, width=64, height=64, seed=99)
    request.update(sampler="Euler", schedule="normal")
    unit = dict(model=str(path), image=image, weight=0.8)
    result = ours.txt2img(PROMPT, **request, control=[unit])
    mine = np.asarray(result.images[0], dtype=np.float32) / 255.0
    diff = np.abs(mine - theirs[0])
    assert diff.max() <= 2 / 255 + 1e-6, diff.max() * 255
    plain = ours.txt2img(PROMPT, **request)
    assert np.abs(np.asarray(plain.images[0], dtype=np.float32) / 255.0 - mine).max() > 4 / 255  # control acts
    text = result.infotexts[0]
    assert 'ControlNet 0: "Module: none, Model: control_tiny [' in text
    assert "Weight: 0.8, Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: " in text
    assert "Control Mode: Balanced" in text and "Threshold" not in text  # -1: unused by "none", left out


# --- the unit rules from their definitions ---------------------------------------------------------------


class _StubNet:
    """Residuals of ones (output i holds i + 1) so that scales are visible."""

    def __init__(self):
        self.config = ControlNetConfig(UNetConfig())

    def __call__(self, x, t, context, hint, y=None):
        outs = [torch.full((x.shape[0], 1, 1, 1), float(i + 1)) for i in range(12)]
        return ControlResiduals(output=outs, middle=torch.full((x.shape[0], 1, 1, 1), 13.0))


def _wrapper(steps: int = 10, **unit):
    sigmas = torch.cat([torch.linspace(10, 1, steps), torch.zeros(1)])
    active = ActiveUnit(_StubNet(), torch.zeros(1, 3, 8, 8), **unit)
    return ControlledDenoiser(None, [active], sigmas), sigmas


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.5), (0.35, 0.35), (0.5, 1.0)])
def test_guidance_range_is_the_step_fraction(start, end):
    d, sigmas = _wrapper(guidance_start=start, guidance_end=end)
    x, ctx = torch.zeros(1, 4, 1, 1), torch.zeros(1, 2, 3)
    for i in range(10):  # the extension: step i of 10 runs iff start <= i / 10 <= end
        res = d.residuals(x, torch.zeros(1), Cond(ctx), float(sigmas[i]))
        assert (res is not None) == (start <= i / 10 <= end), i
    # a second-order midpoint between steps 3 and 4 belongs to step 3
    mid = float((sigmas[3] + sigmas[4]) / 2)
    assert d.step_fraction(mid) == 0.3


def test_weight_and_soft_weights():
    x, ctx = torch.zeros(2, 4, 1, 1), torch.zeros(2, 2, 3)
    d, sigmas = _wrapper(weight=0.6)
    res = d.residuals(x, torch.zeros(2), Cond(ctx), float(sigmas[0]))
    assert [float(r[0]) for r in res.output] == pytest.approx([0.6 * (i + 1) for i in range(12)])
    assert float(res.middle[0]) == pytest.approx(0.6 * 13)
    d, _ = _wrapper(weight=0.6, control_mode=1)  # "My prompt is more important": weight * 0.825 ** (12 - i)
    res = d.residuals(x, torch.zeros(2), Cond(ctx), float(sigmas[0]))
    assert [float(r[0]) for r in res.output] == pytest.approx([0.6 * 0.825 ** (12 - i) * (i + 1) for i in range(12)])
    assert float(res.middle[0]) == pytest.approx(0.6 * 13)


def test_controlnet_more_important_controls_the_conditional_rows_only():
    d, sigmas = _wrapper(weight=1.0, control_mode=2)
    cond, uncond = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    d.uncond = [uncond]
    res = d.residuals(torch.zeros(2, 4, 1, 1), torch.zeros(2), Cond(torch.cat([cond, uncond])), float(sigmas[0]))
    assert float(res.middle[0]) == pytest.approx(13.0) and float(res.middle[1]) == 0.0


class _SizedStubNet(_StubNet):
    """Residuals of ones at 8x8 (the first output) and 4x4 / 2x2 (the others)."""

    def __call__(self, x, t, context, hint, y=None):
        sizes = [8] + [4] * 6 + [2] * 5
        outs = [torch.ones(x.shape[0], 1, s, s) for s in sizes]
        return ControlResiduals(output=outs, middle=torch.ones(x.shape[0], 1, 2, 2))


def test_effective_region_mask_scales_each_residual_resized_bilinearly():
    """The extension's ``apply_effective_region_mask``: residual * interpolate(mask, residual size,
    bilinear, align_corners=False). Expected values by hand: halving a size samples at 2j + 0.5, the mean
    of two neighbouring pixels; quartering at 4j + 1.5, between pixels 4j + 1 and 4j + 2."""
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # left half
    mask[..., 0:4:2] = 0.0  # columns 0 and 2 off: pairs (0, 1) and (2, 3) average 0.5
    sigmas = torch.cat([torch.linspace(10, 1, 4), torch.zeros(1)])
    active = ActiveUnit(_SizedStubNet(), torch.zeros(1, 3, 8, 8), weight=0.5, region=mask)
    res = ControlledDenoiser(None, [active], sigmas).residuals(
        torch.zeros(1, 4, 8, 8), torch.zeros(1), Cond(torch.zeros(1, 2, 3)), float(sigmas[0])
    )
    assert torch.equal(res.output[0][0, 0], 0.5 * mask[0, 0])  # same size: the mask itself
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(4, 4) * 0.5
    assert torch.allclose(res.output[1][0, 0], half)
    quarter = torch.tensor([0.5, 0.0]).expand(2, 2) * 0.5  # 1.5: between pixels 1 (on) and 2 (off); 5.5: off
    assert torch.allclose(res.output[7][0, 0], quarter) and torch.allclose(res.middle[0, 0], quarter)


def test_effective_region_mask_white_is_the_unit_and_black_no_control(e2e):
    _, _, ours, path, _ = e2e
    request = dict(negative_prompt=NEGATIVE, steps=3, cfg_scale=7.0, width=64, height=64, seed=9, sampler="Euler")
    unit = dict(model=str(path), image=_control_image(), weight=0.8)
    full = ours.txt2img(PROMPT, **request, control=[unit]).images[0]
    plain = ours.txt2img(PROMPT, **request).images[0]
    white, black = Image.new("L", (32, 48), 255), Image.new("RGB", (64, 64), (0, 255, 255))  # first channel
    for mask, expected in ((white, full), (black, plain)):
        made = ours.txt2img(PROMPT, **request, control=[{**unit, "effective_region_mask": mask}]).images[0]
        assert np.array_equal(np.asarray(made), np.asarray(expected))
    assert not np.array_equal(np.asarray(full), np.asarray(plain))
    with pytest.raises(RequestError, match="control unit 0 effective_region_mask"):
        ours.txt2img(PROMPT, **request, control=[{**unit, "effective_region_mask": "/nonexistent/mask.png"}])


# --- preprocessors and resize modes -----------------------------------------------------------------------


@pytest.mark.parametrize("low,high", [(100, 200), (50, 120)])
def test_canny_is_opencv_canny(low, high):
    g = np.random.default_rng(5)
    img = (g.random((64, 64, 3)) * 255).astype(np.uint8)
    img = cv2.resize(img, (512, 576), interpolation=cv2.INTER_CUBIC)  # smooth shapes; sides multiples of 64
    edges = canny(img, low, high, 512)
    assert edges.shape == (576, 512, 3)
    assert np.array_equal(edges[:, :, 0], cv2.Canny(img, low, high)) and np.array_equal(edges[:, :, 2], edges[:, :, 0])


def test_resize_modes():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 200  # left half bright
    assert fit(arr, 64, 32, 0).shape == (32, 64, 3)
    crop = fit(arr, 32, 32, 1)  # cover: 40 -> 32 tall, 64 wide, centre 32 columns: half bright, half dark
    assert crop.shape == (32, 32, 3) and crop[:, :14].min() == 200 and crop[:, 18:].max() == 0
    filled = fit(arr, 80, 80, 2)  # fit: 80 wide, 40 tall, 20 rows of border-median padding above and below
    assert filled.shape == (80, 80, 3)
    border_median = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    assert np.array_equal(filled[0, 0], border_median.astype(np.uint8)) and np.array_equal(filled[20:60], arr)


# --- bad input: clear errors before any work -------------------------------------------------------------


def test_controlnet_of_another_family_is_refused(e2e, tmp_path):
    ours = e2e[2]
    xl = ControlNetModel.from_unet(build_reference("sdxl-base").unet)
    other = tmp_path / "xl_control.safetensors"
    save_file({k: v.contiguous() for k, v in xl.state_dict().items()}, str(other))
    with pytest.raises(RequestError, match="another model family"):
        ours.txt2img("x", steps=2, width=64, height=64, control=[dict(model=str(other), image=_control_image())])


def test_missing_image_and_corrupt_file_are_refused(e2e, tmp_path):
    ours, path = e2e[2], e2e[3]
    with pytest.raises(RequestError, match="no control image"):
        ours.txt2img("x", steps=2, width=64, height=64, control=[dict(model=str(path))])
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RequestError, match=r"broken\.safetensors"):
        ours.txt2img("x", steps=2, width=64, height=64, control=[dict(model=str(bad), image=_control_image())])
    with pytest.raises(RequestError, match=r"not in|no ControlNet folder"):
        ours.txt2img("x", steps=2, width=64, height=64, control=[dict(model="nothing_here", image=_control_image())])


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_control_by_name_in_controlnet_dir(e2e, tmp_path):
    from latentforge.cli import main

    _, _, ours, path, _ = e2e
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    image = tmp_path / "edges.png"
    _control_image().save(image)
    out = tmp_path / "out.png"
    model = ours.info.source
    args = ["txt2img", "a cube", "-m", str(model), "-W", "64", "-H", "64", "--steps", "2", "--seed", "5", "-q"]
    args += ["--control", f"{path.stem}:{image}:0.5", "--controlnet-dir", str(folder), "-o", str(out)]
    assert main(args) == 0
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: control_tiny [' in text and "Weight: 0.5," in text
    # --control-region: a black mask leaves the image as without the unit
    black, masked, plain = tmp_path / "black.png", tmp_path / "masked.png", tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "black").save(black)
    assert main([*args[:-2], "--control-region", str(black), "-o", str(masked)]) == 0
    assert main([*args[:-6], "-o", str(plain)]) == 0
    assert np.array_equal(np.asarray(Image.open(masked)), np.asarray(Image.open(plain)))
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    assert main([*args[:-6], "--control-region", str(black), "-o", str(tmp_path / "x.png")]) == 2


def test_parse_control():
    from latentforge.cli_generate import parse_control

    assert "image" not in parse_control("only_a_model")  # img2img: the init image (control.img2img_input)
    with pytest.raises(ValueError, match="MODEL:IMAGE"):
        parse_control("a_model:")
    with pytest.raises(ValueError, match="does not exist"):
        parse_control("m:/nonexistent/image.png:0.5")


def test_depth_preprocessor_is_the_min_max_scaled_midas_depth(e2e, tmp_path):
    """The extension's depth map: MiDaS depth - min, / max, * 255, cut to 8 bits (a tiny DPT-Hybrid found
    in the model folder's depth_estimator/)."""
    from latentforge.models.midas import estimate_depth
    from latentforge.models.midas_load import load_midas
    from latentforge.pipelines.control import preprocess
    from latentforge.pipelines.images import image_to_tensor
    from latentforge.pipelines.request import ControlUnit
    from test_midas import _tiny_hf

    ref = e2e[0]
    folder = save_folder(ref, tmp_path / "with-depth")
    _tiny_hf().save_pretrained(folder / "depth_estimator")
    pipe = latentforge.load(folder, dtype="fp32")
    image = _control_image()
    mine = preprocess(pipe, ControlUnit(model="x", image=image, module="depth", processor_res=64), image)
    with torch.no_grad():
        d = estimate_depth(load_midas(folder / "depth_estimator"), (image_to_tensor(image) + 1) / 2)[0, 0]
    d = d.double().numpy()
    d = (d - d.min()) / (d - d.min()).max()
    expected = np.clip(d * 255.0, 0, 255).astype(np.uint8)
    assert mine.shape == (*expected.shape, 3)
    assert np.abs(mine[:, :, 0].astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("module,soft", [("none", False), ("canny", True)])
def test_hires_pass_is_controlled_soft_weights_for_canny(e2e, module, soft):
    """The extension forces soft weights in the hires pass for canny maps only; the hint is at hires size."""
    from latentforge.adapters.controlnet import ControlledDenoiser as CD
    from latentforge.pipelines import control
    from latentforge.pipelines.generate import build_plan
    from latentforge.pipelines.request import GenerationRequest

    _, _, ours, path, _ = e2e
    unit = dict(model=str(path), image=_control_image(), weight=0.7, module=module)
    req = GenerationRequest.from_dict(
        dict(prompt="x", steps=2, width=64, height=64, enable_hr=True, hr_scale=1.5, control=[unit])
    )
    units = control.prepare(ours, req)
    with torch.inference_mode():
        plan = build_plan(ours, req, None)
        control.apply(plan, ours, units)
    first, hires = plan.passes
    assert isinstance(first.model, CD) and not first.model.units[0].soft
    assert isinstance(hires.model, CD) and hires.model.units[0].soft == soft
    assert hires.model.units[0].hint.shape == (1, 3, 96, 96)


def _plan_with_units(ours, **request):
    from latentforge.pipelines import control
    from latentforge.pipelines.generate import build_plan
    from latentforge.pipelines.request import GenerationRequest

    req = GenerationRequest.from_dict(dict(prompt="x", steps=2, width=64, height=64, **request))
    units = control.prepare(ours, req)
    with torch.inference_mode():
        plan = build_plan(ours, req, None)
        control.apply(plan, ours, units)
    return plan


@pytest.mark.parametrize("option,first_on,hires_on", [("Both", 1, 1), ("Low res only", 1, 0), ("High res only", 0, 1)])
def test_hr_option_picks_the_passes_a_unit_controls(e2e, option, first_on, hires_on):
    _, _, ours, path, _ = e2e
    unit = dict(model=str(path), image=_control_image(), hr_option=option)
    plan = _plan_with_units(ours, enable_hr=True, hr_scale=1.5, control=[unit])
    assert [isinstance(p.model, ControlledDenoiser) for p in plan.passes] == [bool(first_on), bool(hires_on)]
    plain = _plan_with_units(ours, control=[unit])  # no hires pass: every unit controls the one pass
    assert isinstance(plain.passes[0].model, ControlledDenoiser)
    with pytest.raises(RequestError, match="hr_option must be"):
        _plan_with_units(ours, control=[{**unit, "hr_option": "Sometimes"}])


def test_pixel_perfect_resolution_is_the_extensions_rule(e2e):
    """The extension's pixel_perfect_resolution: the image's short side times the scale that covers the
    target (Resize and Fill: that fits it), rounded. A 96x64 image for a 64x64 pass, Resize and Fill:
    min(64/64, 64/96) * 64 = 42.67 -> 43; for the 96x96 hires pass: min(96/64, 96/96) * 64 = 64."""
    from latentforge.pipelines.control import hint_tensor

    _, _, ours, path, _ = e2e
    image = _control_image(96).crop((0, 0, 96, 64))
    unit = dict(model=str(path), image=image, module="canny", resize_mode=2, pixel_perfect=True)
    plan = _plan_with_units(ours, enable_hr=True, hr_scale=1.5, control=[unit])
    arr = np.asarray(image)
    first, hires = (p.model.units[0].hint for p in plan.passes)
    assert torch.equal(first, hint_tensor(canny(arr, 100, 200, 43), 64, 64, 2).to(first.dtype))
    assert torch.equal(hires, hint_tensor(canny(arr, 100, 200, 64), 96, 96, 2).to(hires.dtype))
    # the extension writes the unit as sent (its default 512 for -1): get_enabled_units serializes the units
    # for the infotext before get_control's pixel perfect sets processor_res
    text = plan.infotext["ControlNet 0"]
    assert "Processor Res: 512," in text and "Pixel Perfect: True" in text


def test_sdxl_residuals_equal_diffusers(tmp_path):
    """SDXL: linear projections, per-level depths, heads by channel width and the vector input (pooled text
    and the size numbers' sinusoids, made here with diffusers' own add_time_proj)."""
    ref = build_reference("sdxl-base", seed=4)
    net = perturb(ControlNetModel.from_unet(ref.unet), 9)
    path = tmp_path / "xl.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ours = load_controlnet(path, unet_config_from_diffusers(dict(ref.unet.config)))
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    ctx = torch.randn(1, 77, ref.unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, ref.unet.config.projection_class_embeddings_input_dim - 6 * 8, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    t = torch.tensor([321.0])
    with torch.no_grad():
        down, mid = net(
            x, t, ctx, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False
        )
        y = torch.cat([pooled, net.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=1)
        res = ours(x, t, ctx, hint, y)
    assert len(res.output) == len(down)
    for a, b in [*zip(res.output, down), (res.middle, mid)]:
        ok, diff, scale = close(a, b)
        assert ok, (diff, scale)


def test_infotext_as_the_extension_writes_it():
    from latentforge.pipelines.control import PreparedUnit, infotext
    from latentforge.pipelines.request import ControlUnit

    unit = ControlUnit(model="m", module="canny", weight=1, control_mode="ControlNet is more important")
    text = infotext([PreparedUnit(unit, None, "control_v11p_sd15_canny [d14c016b]", np.zeros((1, 1, 3)))])
    assert text == {
        "ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and "
        "Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: ControlNet is more important"
    }


def test_absurd_sizes_are_refused_before_building(reference):
    from latentforge.adapters.controlnet import ControlNetError, infer_config

    ref, net = reference
    target = unet_config_from_diffusers(dict(ref.unet.config))
    shapes = {k: tuple(v.shape) for k, v in _original_layout(net, 4, 2).items()}
    shapes = {k.removeprefix("control_model."): v for k, v in shapes.items()}
    infer_config(shapes, target, "ok.safetensors")  # the real shapes infer
    shapes["input_hint_block.0.weight"] = (99999, 3, 3, 3)
    with pytest.raises(ControlNetError, match=r"big\.safetensors: widths .* outside latentforge's limits"):
        infer_config(shapes, target, "big.safetensors")


def test_controlnet_holding_nan_is_refused_by_tensor_name(e2e, tmp_path):
    from safetensors.torch import load_file

    ours, path = e2e[2], e2e[3]
    sd = load_file(path)
    key = sorted(k for k in sd if k.endswith(".weight") and sd[k].is_floating_point())[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: tensor '{re.escape(key)}' holds NaN or Inf"):
        load_controlnet(tmp_path / "nan.safetensors", ours.unet.config)
