"""The ``txt2img``, ``img2img``, ``upscale-x4``, ``info`` and ``samplers`` commands."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from latentforge.cli_hires import add_hires_options, hires_options
from latentforge.cli_inpaint import add_inpaint_options, inpaint_group

# request fields settable from the command line: (option, field, type, help)
GEN_OPTIONS = [
    (("-n", "--negative-prompt"), "negative_prompt", str, "what the image should not show"),
    (("--steps",), "steps", int, "denoising steps (default 20)"),
    (("--sampler",), "sampler", str, "sampler, A1111 or ComfyUI name (default 'DPM++ 2M'); see `latentforge samplers`"),
    (("--schedule",), "schedule", str, "sigma schedule: automatic, karras, exponential, normal, sgm_uniform, ..."),
    (
        ("--cfg-scale", "--cfg"),
        "cfg_scale",
        float,
        "classifier-free guidance scale (default: the model's, 7; the demo model's 2)",
    ),
    (("--cfg-rescale",), "guidance_rescale", float, "CFG rescale phi, 0 to 1 (v-prediction models: about 0.7)"),
    (("--seed",), "seed", int, "seed; -1 (default) picks one and reports it; image i uses seed + i"),
    (("-W", "--width"), "width", int, "width in pixels, a multiple of 8 (default: the model's native size)"),
    (("-H", "--height"), "height", int, "height in pixels, a multiple of 8"),
    (("--batch-size",), "batch_size", int, "images per denoising pass (default 1)"),
    (("--batch-count",), "batch_count", int, "passes (default 1)"),
    (("--clip-skip",), "clip_skip", int, "use the k-th text-encoder layer from the end (SD1; A1111's Clip skip)"),
    (("--eta",), "eta", float, "noise of ancestral/DDIM samplers"),
    (("--s-noise",), "s_noise", float, "noise multiplier of stochastic samplers (default 1)"),
    (("--subseed",), "subseed", int, "variation seed (-1: random); image i uses subseed + i"),
    (("--subseed-strength",), "subseed_strength", float, "how far towards the variation seed's noise, 0 to 1"),
    (("--ngms",), "s_min_uncond", float, "A1111's negative guidance minimum sigma (skip the negative prompt below it)"),
    (("--ensd",), "eta_noise_seed_delta", int, "A1111's ENSD: later noise draws use seed + this (e.g. 31337)"),
    (
        ("--rng",),
        "rng",
        str,
        "noise source: CPU (default), GPU (A1111's default), NV, or 'comfy batch' (ComfyUI's whole-batch noise)",
    ),
    (("--preset",), "preset", str, "few-step models: lcm (LCM, 4 steps, CFG 1.5) or turbo (Euler a, 1 step, CFG 1)"),
    (("--token-merging-ratio", "--tome"), "token_merging_ratio", float, "ToMe: merge this share of tokens (0.3-0.5)"),
    (("--token-merging-ratio-hr",), "token_merging_ratio_hr", float, "ToMe ratio of the hires pass"),
    (("--token-merging-max-downsample",), "token_merging_max_downsample", int, "ToMe's levels: 1 (default), 2 (SDXL)"),
    (("--deepcache-interval", "--deepcache"), "deepcache_interval", int, "DeepCache: the whole UNet every N steps"),
    (("--deepcache-depth",), "deepcache_depth", int, "DeepCache's skip branch: 0 (default, the shallowest)"),
    (("--deepcache-schedule",), "deepcache_schedule", str, "DeepCache's cache steps: uniform or non-uniform"),
]


def add_generation_options(p: argparse.ArgumentParser, img2img: bool, x4: bool = False) -> None:
    if x4:
        p.add_argument("init_image", type=Path, help="the low-resolution image to upscale 4x")
    elif img2img:
        p.add_argument("init_image", type=Path, help="the image to start from")
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (A1111 syntax: (word:1.2), BREAK)")
    p.add_argument(
        "-m",
        "--model",
        type=Path,
        help="checkpoint file or diffusers folder (default: $LATENTFORGE_MODEL, else the bundled demo model)",
    )
    p.add_argument("--vae", type=Path, help="replace the checkpoint's VAE")
    p.add_argument("--prediction", choices=["eps", "v"], help="override eps/v detection")
    for flags, dest, typ, help_ in GEN_OPTIONS:
        p.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    if x4:
        p.add_argument(
            "--noise-level", type=int, default=None, help="noise added to the input first, 0 to 350 (default 20)"
        )
        p.add_argument(
            "--tile",
            type=int,
            default=None,
            help="input pixels per tile for large inputs (default: automatic above 256 px; 0: never)",
        )
        p.add_argument(
            "--resize-mode", dest="resize_mode", type=int, choices=[0, 1, 2], default=None, help="as img2img's"
        )
    else:
        _add_refiner_options(p)
        _add_strength(p, img2img)
    _add_output_options(p)


def _add_refiner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--refiner",
        dest="refiner_checkpoint",
        type=Path,
        default=None,
        help="SDXL refiner checkpoint: it continues the base's latents for the last part of the steps",
    )
    p.add_argument(
        "--refiner-switch-at",
        dest="refiner_switch_at",
        type=float,
        default=None,
        help="fraction of the denoising done by the base before the refiner takes over (default 0.8)",
    )
    p.add_argument(
        "--refiner-switch-by-steps",
        dest="refiner_switch_by_steps",
        action="store_true",
        default=None,
        help="switch at that fraction of the steps (A1111's option) instead of the noise level (its default)",
    )


def _add_strength(p: argparse.ArgumentParser, img2img: bool) -> None:
    p.add_argument(
        "--strength",
        "--denoising-strength",
        dest="denoising_strength",
        type=float,
        default=None,
        help="how much to change the image, 0 to 1 (default 0.75)"
        if img2img
        else "with --hires: how much the second pass changes the upscaled image, 0 to 1 (default 0.75)",
    )
    if img2img:
        p.add_argument(
            "--resize-mode",
            dest="resize_mode",
            type=int,
            choices=[0, 1, 2, 3],
            default=None,
            help="0 resize (default), 1 crop and resize, 2 resize and fill, 3 resize the latent (no mask)",
        )
        p.add_argument(
            "--noise-multiplier",
            dest="initial_noise_multiplier",
            type=float,
            default=None,
            help="A1111's img2img noise multiplier: scale the noise added to the image (default 1)",
        )
        add_inpaint_options(p)
        p.add_argument("--depth-map", type=Path, help="depth models: the depth map (an image, brighter = nearer)")
        p.add_argument("--depth-model", type=Path, help="depth models: the MiDaS file that estimates the depth map")
    if not img2img:
        add_hires_options(p)


# pipelines.checks.CONTROL_MODULES, written out here so the parser imports no torch (tests/test_hed.py)
CONTROL_MODULE_CHOICES = ["none", "canny", "depth", "softedge_hed", "softedge_hedsafe", "hed", "hed_safe"]
CONTROL_MODULE_CHOICES += ["inpaint", "inpaint_global_harmonious", "inpaint_only"]  # as checks.CONTROL_MODULES


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--style",
        action="append",
        default=[],
        help="apply a saved A1111 prompt style by name (repeatable, in order; from --styles-file)",
    )
    p.add_argument(
        "--styles-file",
        action="append",
        default=[],
        help="an A1111 styles.csv (repeatable, wildcards allowed; default: the styles.csv of the A1111 "
        "installation the model is in)",
    )
    p.add_argument(
        "--sgm-noise",
        dest="sgm_noise_multiplier",
        action="store_true",
        default=None,
        help="start from sqrt(1 + sigma^2) * noise (SGM/ComfyUI/diffusers) instead of sigma * noise (A1111)",
    )
    p.add_argument(
        "--tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="A1111's Tiling: a seamless image that tiles (the model's convolutions pad circularly)",
    )
    p.add_argument(
        "--token-merging-random",
        dest="token_merging_random",
        action="store_true",
        default=None,
        help="ToMe: random merge destinations, seeded by the seed (A1111: top left of each 2x2 region)",
    )
    p.add_argument("--seed-resize-from", metavar="WxH", help="A1111's 'Seed resize from': the noise of this size")
    p.add_argument(
        "--from",
        dest="from_image",
        type=Path,
        help="reproduce the image made with the parameters stored in this PNG; other options given here override them",
    )
    p.add_argument(
        "--allow-differences",
        action="store_true",
        help="with --from: generate even when the image names settings latentforge cannot reproduce (a warning)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="weights dtype (default: automatic, the fastest for the device: bf16 for full-size models on CPUs "
        "with native bf16, fp16 on CUDA, else fp32; $LATENTFORGE_DTYPE overrides it)",
    )
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument(
        "--pack-weights",
        action="store_true",
        help="CPU: pack convolution and bf16 linear weights once into oneDNN's layout (same images; more memory)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the UNet with torch.compile (CUDA graphs on a GPU): the first image waits for compiling "
        "(a minute on a GPU, longer on a CPU), later images of --n-iter/--batch-size run faster",
    )
    p.add_argument(
        "--lora-dir", type=Path, action="append", default=[], help="folder of LoRA files named by <lora:name:w> tags"
    )
    p.add_argument(
        "--embeddings-dir", type=Path, action="append", default=[], help="folder of textual-inversion embeddings"
    )
    p.add_argument(
        "--hypernetwork-dir",
        type=Path,
        action="append",
        default=[],
        help="folder of A1111 hypernetworks named by <hypernet:name:w> tags",
    )
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODEL[:IMAGE[:WEIGHT]]",
        help="a ControlNet unit (repeatable): a ControlNet file path or name in --controlnet-dir, its control image, "
        "its weight (default 1); in img2img without an image it takes the init image (and --mask for inpaint units)",
    )
    p.add_argument(
        "--control-module",
        choices=CONTROL_MODULE_CHOICES,
        default="none",
        help="preprocessor of the --control images (default none: the image is the control map)",
    )
    p.add_argument(
        "--control-region",
        type=Path,
        action="append",
        default=[],
        metavar="MASK",
        help="where the n-th --control unit acts: a mask image, white = fully (the extension's effective region)",
    )
    p.add_argument("--controlnet-dir", type=Path, action="append", default=[], help="folder of ControlNet models")
    p.add_argument(
        "--annotator-dir",
        type=Path,
        action="append",
        default=[],
        help="folder of ControlNet preprocessor models (softedge_hed: ControlNetHED.pth; repeatable)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=[],
        help="an A1111 or ComfyUI installation: its models/Lora (models/loras) and embeddings (models/embeddings)",
    )
    p.add_argument("-o", "--output", type=Path, help="output image (several: name-1.png, name-2.png, ...)")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=["png", "jpeg", "webp"],
        help="format of numbered outputs (default png; JPEG and WebP keep the parameters as A1111 does, in EXIF)",
    )
    p.add_argument(
        "--outdir", type=Path, default=Path("outputs"), help="folder for numbered outputs (default outputs/)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# C0 controls except tab and newline, DEL, C1 controls (ESC and CSI start terminal sequences), and the
# bidirectional overrides that reorder what a terminal shows
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str, *, newlines: bool = True) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), so text from a file (a PNG's
    parameters, an error quoting them) cannot move the cursor, retitle or recolour the terminal.
    Tabs are kept, and newlines unless ``newlines=False``."""
    if not newlines:
        text = text.replace("\n", "\\n")

    def escape(m: re.Match) -> str:
        code = ord(m.group(0))
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, text)


class ProgressBar:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        done = event.fraction
        elapsed = time.perf_counter() - self.start
        width = 30
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        rate = (event.iteration * event.steps + event.step) / elapsed if elapsed > 0 else 0.0
        line = f"[{bar}] {done * 100:5.1f}%  step {event.step}/{event.steps}"
        if event.iterations > 1:
            line += f"  pass {event.iteration + 1}/{event.iterations}"
        line += f"  {rate:.2f} it/s"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif time.perf_counter() - self.last_line > 5 or done >= 1:
            print(line, file=sys.stderr, flush=True)
            self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def default_model() -> Path:
    env = os.environ.get("LATENTFORGE_MODEL")
    if env:
        return Path(env)
    from latentforge.demo import bundled_model_path

    path = bundled_model_path()
    if path is None:
        raise ValueError(
            "no model given: pass --model PATH (a .safetensors/.ckpt file or a diffusers folder) "
            "or set LATENTFORGE_MODEL"
        )
    return path


def build_request(args: argparse.Namespace, img2img: bool, x4: bool = False, upscaler_dirs=()):
    from latentforge.pipelines import GenerationRequest, RequestError
    from latentforge.pipelines.metadata import request_from_image, unreproduced_fields

    req = GenerationRequest()
    meta = None
    pick = None  # with --from: the index of the wanted image within the regenerated batch
    if args.from_image is not None:
        req, meta = request_from_image(args.from_image)
        pick = meta["batch_index"]
        wanted = "upscale-x4" if x4 else "img2img" if img2img else "txt2img"
        if meta["mode"] != wanted:
            command = {"img2img": "img2img INIT_IMAGE", "upscale-x4": "upscale-x4 IMAGE"}.get(meta["mode"], "txt2img")
            raise RequestError(f"{args.from_image} was made by {meta['mode']}; use `latentforge {command} --from`")
        if not args.quiet:
            print(f"parameters from {args.from_image} ({meta['source']})", file=sys.stderr)
        missing = unreproduced_fields(req)
        if missing:
            what = ", ".join(f"{k}: {req.extra[k]}" for k in missing)
            if not args.allow_differences:
                raise ValueError(
                    f"{args.from_image} was made with settings latentforge cannot reproduce ({what}); the image "
                    "would differ. Pass --allow-differences to generate anyway."
                )
            print(terminal_safe(f"warning: not reproduced: {what}", newlines=False), file=sys.stderr)
    options = {}
    if args.prompt is not None:
        options["prompt"] = args.prompt
    dests = [dest for _, dest, _, _ in GEN_OPTIONS]
    dests += ["sgm_noise_multiplier", "denoising_strength", "resize_mode"]
    dests += ["refiner_switch_at", "refiner_switch_by_steps", "token_merging_random", "initial_noise_multiplier"]
    dests += ["tiling", "inpainting_mask_weight"]
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None:
            options[dest] = value
    if getattr(args, "refiner_checkpoint", None) is not None:
        options["refiner_checkpoint"] = str(args.refiner_checkpoint)
    if x4:
        group = _x4_group(req)
        for name in ("noise_level", "tile"):
            if getattr(args, name, None) is not None:
                group[name] = getattr(args, name)
        options["x4"] = group
    options.update(hires_options(args, req.hires is not None))
    if img2img and not x4:
        group = inpaint_group(args, req.to_dict()["inpaint"])
        if group is not None:
            options["inpaint"] = group
        if args.depth_map is not None or args.depth_model is not None:
            current = req.to_dict()["depth"] or {}
            given = {"map": args.depth_map and str(args.depth_map), "model": args.depth_model and str(args.depth_model)}
            options["depth"] = {**current, **{k: v for k, v in given.items() if v}}
    if getattr(args, "control", None):
        options["control"] = [parse_control(v, args.control_module) for v in args.control]
    regions = getattr(args, "control_region", None) or []
    if len(regions) > len(options.get("control", [])):
        raise ValueError(f"{len(regions)} --control-region masks for {len(options.get('control', []))} --control units")
    for unit, region in zip(options.get("control", []), regions):
        unit["effective_region_mask"] = str(region)
    if getattr(args, "seed_resize_from", None):
        try:
            w, h = (int(v) for v in args.seed_resize_from.lower().split("x"))
        except ValueError:
            raise ValueError(f"--seed-resize-from takes WIDTHxHEIGHT, got {args.seed_resize_from!r}") from None
        options.update(seed_resize_from_w=w, seed_resize_from_h=h)
    req = req.with_options(**options)
    if getattr(args, "style", None):
        req = _styled(req, args)
    if args.seed is not None or args.batch_size is not None or args.batch_count is not None:
        pick = None  # the user asked for other images than the stored one
    req.validate(img2img=img2img and not x4, upscaler_files=bool(upscaler_dirs))
    return req, pick, meta


def _styled(req, args: argparse.Namespace):
    """The request with the --style styles applied (A1111's rules, conditioning/styles.py) to its prompts."""
    import dataclasses

    from latentforge.conditioning.styles import apply_styles_to_passes, read_styles

    files = list(args.styles_file)
    if not files and args.model is not None and Path(args.model).resolve().parent.parent.name.lower() == "models":
        files = [Path(args.model).resolve().parent.parent.parent / "styles.csv"]  # models/Stable-diffusion/x
    if not files:
        raise ValueError("--style needs --styles-file (an A1111 styles.csv)")
    h = req.hires
    texts = (req.prompt, req.negative_prompt, h.prompt if h else "", h.negative_prompt if h else "")
    prompt, negative, hr_prompt, hr_negative = apply_styles_to_passes(texts, args.style, read_styles(files))
    if h is not None:
        h = dataclasses.replace(h, prompt=hr_prompt, negative_prompt=hr_negative)
    return dataclasses.replace(req, prompt=prompt, negative_prompt=negative, hires=h)


def parse_control(value: str, module: str = "none") -> dict:
    """``MODEL[:IMAGE[:WEIGHT]]`` -> a ControlNet unit (the weight is the last part when it is a number)."""
    if ":" not in value and value:  # no image: img2img's init image (control.img2img_input)
        return {"model": value, "weight": 1.0, "module": module}
    parts = value.split(":")
    weight = 1.0
    if len(parts) >= 3:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        raise ValueError(f"--control takes MODEL:IMAGE[:WEIGHT], got {value!r}")
    image = ":".join(parts[1:])
    if not Path(image).is_file():
        raise ValueError(f"--control {value!r}: the control image {image} does not exist")
    return {"model": parts[0], "image": image, "weight": weight, "module": module}


def _x4_group(req) -> dict:
    """The x4 options of a request read with --from, or the defaults."""
    import dataclasses

    from latentforge.pipelines import X4Options

    return dataclasses.asdict(req.x4 if req.x4 is not None else X4Options())


def cmd_generate(args: argparse.Namespace, img2img: bool, x4: bool = False) -> int:
    import latentforge
    from latentforge import upscalers
    from latentforge.io.images import output_paths, save_image, save_numbered
    from latentforge.io.writer import OutputError, check_writable_folder, refuse_existing
    from latentforge.pipelines.checks import hires_upscaler
    from latentforge.pipelines.generate import output_size
    from latentforge.pipelines.images import open_image
    from latentforge.pipelines.request import builtin_upscaler

    model = args.model or default_model()
    dirs = [] if img2img else upscalers.search_dirs(args.upscaler_dir or (), near=model)
    req, pick, meta = build_request(args, img2img, x4, dirs)
    upscaler = hires_upscaler(req.hires) if req.hires is not None else None
    if not img2img and upscaler is not None and builtin_upscaler(upscaler) is None:
        upscalers.find(upscaler, dirs)  # a missing model file is an error before loading the checkpoint
    n = 1 if pick is not None else req.batch_size * req.batch_count
    # check the output location and the init image before loading the model and the minutes of work
    paths = output_paths(args.output, args.outdir, list(range(n)), args.image_format)
    if args.output is not None:
        for p in paths:
            if os.path.isdir(p):
                raise OutputError(f"{p} is a folder; -o/--output takes an image file name (--outdir takes a folder)")
            refuse_existing(p, args.overwrite)
        check_writable_folder(args.output.parent, "-o/--output location")
    else:
        check_writable_folder(args.outdir, "--outdir")
    init = None
    if img2img:
        init = open_image(args.init_image, "input image" if x4 else "init image")
        if not x4:  # the x4 output is 4x the image (checked by its task)
            output_size(req, init, 0)
        if req.inpaint is not None and isinstance(req.inpaint.mask, (str, os.PathLike)):
            open_image(req.inpaint.mask, "mask")  # read again by the task: a bad file is found before loading
    adapter_dirs = (*args.lora_dir, *args.embeddings_dir, *args.hypernetwork_dir, *args.controlnet_dir)
    for folder in (*adapter_dirs, *args.annotator_dir):
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is not a folder (given with --lora-dir, --embeddings-dir, --hypernetwork-dir, "
                "--controlnet-dir or --annotator-dir)"
            )
    pipe = latentforge.load(model, vae=args.vae, prediction=args.prediction, dtype=args.dtype, device=args.device)
    if getattr(args, "pack_weights", False):
        pipe.pack_weights()
    if getattr(args, "compile", False):
        pipe.compile()
    pipe.folders.lora += args.lora_dir
    pipe.folders.embeddings += args.embeddings_dir
    pipe.folders.hypernetworks += args.hypernetwork_dir
    pipe.folders.controlnet += args.controlnet_dir
    pipe.folders.annotators += args.annotator_dir
    for root in args.models_dir:
        pipe.folders.add_models_dir(root)
    if meta is not None:
        from latentforge.pipelines.metadata import model_differences

        for difference in model_differences(pipe, meta):
            print(terminal_safe(f"warning: {difference}; the result will differ", newlines=False), file=sys.stderr)
    bar = ProgressBar(not args.quiet)
    try:
        if x4:
            result = pipe.upscale(init, request=req, progress=bar)
        elif img2img:
            result = pipe.img2img(init, request=req, progress=bar)
        else:
            result = pipe.txt2img(request=req, progress=bar, upscaler_dirs=dirs)
    except KeyboardInterrupt:
        print("\nlatentforge: interrupted before any image was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    images, seeds = result.images, result.seeds
    if pick is not None:  # --from: the batch was made again to get the same pixels; keep the stored image
        images, seeds = [images[pick]], [seeds[pick]]
    for i, (image, seed) in enumerate(zip(images, seeds)):
        if args.output is not None:
            path = save_image(image, paths[i], overwrite=args.overwrite)
        else:  # numbered names carry the seeds actually used and are claimed atomically when written
            path = save_numbered(image, args.outdir, seed, paths[0].suffix)
        print(path)
    if not args.quiet:
        print(f"seed {seeds[0]}, {len(images)} image(s) in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def print_stored_info(args: argparse.Namespace) -> int:
    import json

    from latentforge.pipelines.metadata import read_png_metadata

    meta = read_png_metadata(args.image)
    if not meta["parameters"] and not meta["latentforge"]:
        print(f"{args.image}: no generation parameters found", file=sys.stderr)
        return 1
    if meta["parameters"]:
        print(terminal_safe(meta["parameters"]))
    elif not args.json:  # a record alone: say so, not nothing
        print(f"{args.image}: no A1111 parameters, only latentforge's record (--json prints it)", file=sys.stderr)
    if meta["latentforge"] and args.json:
        print(terminal_safe(json.dumps(meta["latentforge"], indent=2)))  # ensure_ascii escapes; kept for safety
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from latentforge.sampling import SAMPLERS
    from latentforge.sampling.schedules import SCHEDULES

    print(f"{'A1111 name':<22} {'ComfyUI/latentforge':<31} {'default schedule':<16} notes")
    for info in SAMPLERS:
        notes = []
        if info.stochastic:
            notes.append("stochastic")
        if info.brownian:
            notes.append("Brownian noise")
        if info.second_order:
            notes.append("second order")
        if info.discard_penultimate_sigma:
            notes.append("drops next-to-last sigma")
        comfy = [a for a in info.aliases if not a.startswith("k_")]
        if comfy:
            notes.append("also " + ", ".join(comfy))
        print(f"{info.title:<22} {info.name:<31} {info.schedule:<16} {', '.join(notes)}")
    print("\nschedules: automatic, " + ", ".join(SCHEDULES))
    print("A1111 names with a schedule also work, e.g. 'DPM++ 2M Karras', 'DPM++ 2M SDE Exponential'.")
    return 0
