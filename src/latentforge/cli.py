"""The ``latentforge`` command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import NoReturn


def _human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _adapter_kind(path: Path) -> str | None:
    """ "lora", "embedding" or None (a checkpoint), from tensor names only (no weights are read)."""
    from latentforge.adapters.keys import split_key
    from latentforge.io.tensorfile import PICKLE_SUFFIXES, open_tensor_file

    if path.is_dir() or path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        return None
    f = open_tensor_file(path)
    try:
        keys = f.keys()
    finally:
        f.close()
    if any(split_key(k) is not None for k in keys):
        return "lora"
    if len(keys) <= 2:  # A1111 .pt (nested, so no top-level tensors), emb_params, {token: v}, clip_l/clip_g
        return "embedding"
    return None


def _say(line: str) -> None:
    """Print a line of ``inspect``'s report. Tensor, module and file names come from the file: control
    characters (ESC, CSI, bidi overrides) are escaped as ``latentforge info`` escapes infotext, and so are
    lone surrogates (a pickle's names may hold them), which a strict UTF-8 stdout cannot write."""
    from latentforge.cli_generate import terminal_safe

    print(_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", terminal_safe(line, newlines=False)))


_SURROGATE = re.compile("[\ud800-\udfff]")


def cmd_inspect_adapter(args: argparse.Namespace, kind: str) -> int:
    import latentforge

    pipe = latentforge.load(args.model) if args.model else None
    if kind == "lora":
        from latentforge.adapters.keys import model_index
        from latentforge.adapters.lora import LoraError, apply_lora, guess_family, match, read_lora

        lora = read_lora(args.file)
        text = sum(1 for n in lora.modules if n.startswith(("lora_te", "text_encoder")))
        _say(f"{args.file}  (LoRA/LyCORIS adapter)")
        _say(f"  modules:     {len(lora.modules)} ({len(lora.modules) - text} UNet, {text} text encoder)")
        _say(f"  kinds:       {', '.join(f'{k} {n}' for k, n in lora.kinds.items())}")
        _say(f"  made for:    {guess_family(lora) or 'unknown (no cross-attention layer to tell by)'}")
        if pipe is not None:
            found, _ = match(lora, model_index(pipe.networks(), pipe.unet.config.num_res_blocks))
            _say(f"  model:       {args.model} ({pipe.family.name}): {len(found)} of {len(lora.modules)} modules match")
            try:
                apply_lora(pipe, args.file, source="inspect")
                _say("               fits: yes (names and shapes)")
            except LoraError as e:
                _say(f"               fits: no: {e}")
            pipe.patcher.remove("inspect")
        return 0
    from latentforge.conditioning.embeddings import read_embedding

    emb = read_embedding(args.file)
    widths = {k: tuple(v.shape) for k, v in emb.vectors.items()}
    _say(f"{args.file}  (textual-inversion embedding {emb.name!r})")
    _say(f"  vectors:     {emb.count} ({', '.join(f'{k}: width {s[1]}' for k, s in widths.items())})")
    fits = {768: "sd1 (CLIP-L)", 1024: "sd2 (OpenCLIP-H)", 1280: "sdxl-refiner (bigG)"}
    family = (
        "sdxl-base (CLIP-L + bigG)"
        if "clip_l" in emb.vectors
        else fits.get(emb.vectors.get("*", emb.vectors.get("clip_g")).shape[1])
    )
    _say(f"  made for:    {family or 'unknown width'}")
    if pipe is not None:
        ok = emb.for_encoders(pipe.text.slots) is not None
        _say(f"  model:       {args.model} ({pipe.family.name}): {'fits' if ok else 'does not fit (other widths)'}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from latentforge.families.detect import describe_signature
    from latentforge.loading import inspect_checkpoint

    kind = _adapter_kind(args.file)
    if kind is not None:
        return cmd_inspect_adapter(args, kind)

    info = inspect_checkpoint(args.file, probe=args.probe)
    _say(f"{info['path']}  ({info['layout']})")
    _say(f"  family:      {info['family']} - {info['title']}")
    _say(f"  detected by: {describe_signature(info['signature'])}")
    _say(f"               matching families: {', '.join(info['candidates'])}")
    _say(f"  prediction:  {info['prediction']} ({info['prediction_reason']})")
    _say(f"  native size: {info['default_size']} px, latent scale {info['latent_scale']}")
    total = 0
    for name, comp in info["components"].items():
        total += comp["parameters"]
        _say(f"  {name:<24} {_human(comp['parameters']):>8} parameters  dtype {', '.join(comp['dtypes'])}")
    _say(f"  {'total':<24} {_human(total):>8} parameters")
    if info["extras"]:
        shown = ", ".join(info["extras"][:4]) + (" ..." if len(info["extras"]) > 4 else "")
        _say(f"  other tensors kept aside ({len(info['extras'])}): {shown}")
    if info["dropped"]:
        _say(f"  ignored EMA copy: {len(info['dropped'])} tensors under model_ema.")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import latentforge

    pipe = latentforge.load(args.input, vae=args.vae, prediction=args.prediction, dtype=args.dtype)
    out = pipe.save(args.output, layout=args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to}, family {pipe.family.name}, prediction {pipe.prediction})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """An image's A1111 infotext (and with --json our record), as ``cli_generate.print_stored_info`` prints them; for
    an image that carries only a ComfyUI graph, the parameters ``--from`` reads from it, by the same reader
    (``request_from_image``), or why the graph cannot be turned into a request."""
    from latentforge.cli_generate import print_stored_info as print_stored
    from latentforge.cli_generate import terminal_safe
    from latentforge.pipelines.metadata import read_png_metadata, request_from_image
    from latentforge.pipelines.request import RequestError

    meta = read_png_metadata(args.image)
    if meta["parameters"] or meta["latentforge"] or not meta["comfy"]:
        return print_stored(args)
    graph = f"{args.image}: a ComfyUI graph (its 'prompt' text chunk)"
    try:
        req, about = request_from_image(args.image)
    except RequestError as e:
        reason = str(e).removeprefix(f"{args.image}: ").removeprefix("ComfyUI graph: ")
        message = f"{graph}, but it cannot be turned into generation parameters: {reason}"
        print(terminal_safe(message, newlines=False), file=sys.stderr)
        return 1
    command = "img2img INIT_IMAGE" if about["mode"] == "img2img" else "txt2img"
    print(terminal_safe(f"{graph}; `latentforge {command} --from` reads these parameters from it:", newlines=False))
    print(terminal_safe(_comfy_infotext(req, about)))
    if getattr(args, "json", False):  # the request --from would run, as our record's "request" holds one
        import json

        record = {"source": "comfyui", "mode": about["mode"], "model": about.get("model"), "request": req.to_dict()}
        print(terminal_safe(json.dumps(record, indent=2, default=str)))
    return 0


def _comfy_infotext(req, about: dict) -> str:
    """What ``request_from_comfy`` read, in A1111's infotext form and names (the samplers and schedules as
    ComfyUI names them, which latentforge takes too)."""
    from latentforge.io.infotext import format_infotext

    params = {
        "Steps": req.steps,
        "Sampler": req.sampler,
        "Schedule type": req.schedule,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": req.seed,
        "Size": f"{req.width}x{req.height}" if req.width and req.height else None,  # (img2img: the init image's)
        "Batch size": req.batch_size if req.batch_size != 1 else None,
        "Model": about["model"]["name"],
        "Denoising strength": f"{req.denoising_strength:g}" if about["mode"] == "img2img" else None,
        "SGM noise multiplier": True if req.sgm_noise_multiplier else None,
        "RNG": req.rng,
    }
    return format_infotext(req.prompt, req.negative_prompt, params)


def cmd_upscale(args: argparse.Namespace) -> int:
    from latentforge import upscalers
    from latentforge.io.images import FORMATS, read_user_comment, save_image
    from latentforge.io.writer import refuse_existing
    from latentforge.pipelines.images import check_pixels, open_image

    if args.max_output_pixels < 1:
        raise ValueError(f"--max-output-pixels must be 1 or more, got {args.max_output_pixels}")
    dirs = upscalers.search_dirs(args.upscaler_dir or ())
    upscaler = upscalers.load(args.upscaler, dirs, device=args.device or "cpu")
    upscaler.max_pixels = args.max_output_pixels  # the network's own check of each pass too
    out = args.output or args.image.with_name(f"{args.image.stem}-{upscaler.name}.png")
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: unknown image format; use a name ending in {', '.join(FORMATS)}")
    refuse_existing(out, args.overwrite)
    size = _header_size(args.image)
    if size is not None:  # the input's and the output's size from the header: before any pixel is decoded
        check_pixels(size, f"image {args.image}")
        upscalers.check_upscale(size, upscaler, args.scale, args.max_output_pixels, "--max-output-pixels")
    # the shared reader: its pixel limit is checked from the header (a decompression bomb is refused
    # with a message, not a traceback), and 16-bit grey images keep their levels
    im = open_image(args.image, "image")
    try:
        image = im.convert("RGB")  # an alpha channel is dropped, as A1111's Extras does
        parameters = im.info.get("parameters") or read_user_comment(im)
    except OSError as e:
        raise ValueError(f"cannot read image {args.image}: {e}") from None
    result = upscalers.upscale_image(image, upscaler, args.scale)
    scale = args.scale or upscaler.scale
    extras = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {upscaler.name}"  # A1111's Extras fields
    result.info["parameters"] = f"{parameters}\n{extras}" if parameters else extras
    save_image(result, out, overwrite=args.overwrite)
    print(out)
    return 0


UPSCALE_MAX_PIXELS = 8192 * 8192  # models.esrgan.ImageUpscaler.max_pixels (not imported here: torch)


def _header_size(path: Path) -> tuple[int, int] | None:
    """An image's size from its header, or None when PIL cannot read it (``open_image`` says why)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels has our limit
            with Image.open(path) as im:
                return im.size
    except Exception:  # any failure of a decoder on a hostile file: the shared reader's message follows
        return None


class _Parser(argparse.ArgumentParser):
    """argparse with errors of one line and a hint: the usage block argparse prints first (dozens of lines
    for txt2img) would hide the error. The command parsers are of this class too (``add_subparsers``)."""

    def error(self, message: str) -> NoReturn:
        from latentforge.cli_generate import terminal_safe

        message = terminal_safe(f"{self.prog}: error: {message}", newlines=False)
        self.exit(2, f"{message}\nrun `{self.prog} --help` to see the options\n")

    def add_subparsers(self, **kwargs):
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, with unknown arguments reported by the command's parser, whose --help lists the
        options that command takes (argparse reports them from the top-level parser)."""
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = getattr(self, "_commands", None)
            name = getattr(namespace, commands.dest, None) if commands is not None else None
            owner = commands.choices.get(name, self) if commands is not None else self
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentforge", description="Stable Diffusion with the files you already have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and generation do")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads per generation (default: every usable core; also OMP_NUM_THREADS, LATENTFORGE_THREADS)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's family, how it was detected, components and dtypes; or what a LoRA or "
        "embedding file is and whether it fits a model (-m)",
    )
    p.add_argument("file", type=Path, help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--probe", action="store_true", help="run the UNet once if needed to tell eps from v")
    p.add_argument("-m", "--model", type=Path, help="LoRA/embedding files: check them against this model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert between single-file and diffusers layouts")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--to", choices=["single-file", "diffusers"], required=True)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store weights in this dtype (default: as loaded)")
    p.add_argument("--vae", type=Path, help="replace the checkpoint's VAE with this VAE file")
    p.add_argument("--prediction", choices=["eps", "v"], help="override eps/v detection")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    from latentforge import cli_generate as gen

    p = sub.add_parser("txt2img", help="generate images from a prompt")
    gen.add_generation_options(p, img2img=False)
    p.set_defaults(func=lambda a: gen.cmd_generate(a, img2img=False))
    p = sub.add_parser("img2img", help="generate from an init image and a prompt")
    gen.add_generation_options(p, img2img=True)
    p.set_defaults(func=lambda a: gen.cmd_generate(a, img2img=True))
    p = sub.add_parser("upscale-x4", help="upscale an image 4x with an x4 upscaler model, guided by a prompt")
    gen.add_generation_options(p, img2img=True, x4=True)
    p.set_defaults(func=lambda a: gen.cmd_generate(a, img2img=True, x4=True))
    p = sub.add_parser(
        "info", help="print the generation parameters stored in an image (A1111, latentforge or ComfyUI)"
    )
    p.add_argument("image", type=Path)
    p.add_argument("--json", action="store_true", help="also print latentforge's exact JSON record")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("upscale", help="enlarge an image with an ESRGAN-family model (A1111's Extras tab)")
    p.add_argument("image", type=Path)
    p.add_argument(
        "-u", "--upscaler", required=True, help="a .pth/.safetensors file, or its name (file stem) in the folders"
    )
    p.add_argument("--scale", type=float, help="factor (default: the model's own; others are Lanczos-resized)")
    p.add_argument(
        "--max-output-pixels",
        type=int,
        default=UPSCALE_MAX_PIXELS,
        metavar="N",
        help=f"refuse outputs (and the network's passes) over N pixels (default {UPSCALE_MAX_PIXELS}: "
        "8192x8192, about 800 MB while upscaling)",
    )
    p.add_argument(
        "--upscaler-dir",
        type=Path,
        action="append",
        help="folder of upscaler models (repeatable; models/ESRGAN and models/upscale_models are searched too)",
    )
    p.add_argument(
        "-o", "--output", type=Path, help="output .png/.jpg/.webp (default: IMAGE-UPSCALER.png beside the input)"
    )
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_upscale)
    p = sub.add_parser("samplers", help="list the samplers and schedules with their names")
    p.set_defaults(func=gen.cmd_samplers)
    from latentforge.cli_train import add_train_parsers

    add_train_parsers(sub)
    from latentforge.cli_serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: {args.threads} is not a thread count; give 1 or more")
        from latentforge.threads import fix_threads

        fix_threads(args.threads)
    from latentforge.adapters.folders import AdapterNotFound
    from latentforge.cli_generate import terminal_safe
    from latentforge.families.detect import DetectionError
    from latentforge.io.components import LoadError
    from latentforge.io.tensorfile import CheckpointError
    from latentforge.pipelines.numerics import NonFiniteError
    from latentforge.train.data import DataError

    try:
        return args.func(args)
    except (
        CheckpointError,
        DetectionError,
        LoadError,
        DataError,
        NonFiniteError,
        OSError,
        ValueError,
        AdapterNotFound,
    ) as e:
        # one line, with what came from files escaped (OSError covers FileExistsError and folders
        # that vanish or fill up while writing)
        print(f"latentforge: error: {terminal_safe(str(e), newlines=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
