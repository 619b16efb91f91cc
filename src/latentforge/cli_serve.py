"""The ``serve`` command: the HTTP server (A1111's API, the jobs extension, the web page) with A1111's flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP server: A1111's /sdapi/v1 API and a web page (needs [server])")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860, as A1111)")
    p.add_argument(
        "--listen", action="store_true", help="accept connections from the network (0.0.0.0); default 127.0.0.1 only"
    )
    p.add_argument("--host", help="bind this address instead (overrides --listen)")
    p.add_argument(
        "--controlnet-dir",
        type=Path,
        action="append",
        default=[],
        help="folder of ControlNet files that alwayson_scripts.controlnet units may name (repeatable)",
    )
    for flag, what in (
        ("--lora-dir", "LoRA files that <lora:name:w> tags name"),
        ("--embeddings-dir", "textual-inversion embeddings that prompts name"),
        ("--hypernetwork-dir", "A1111 hypernetworks that <hypernet:name:w> tags name"),
        ("--vae-dir", "standalone VAEs that the sd_vae setting names"),
    ):
        p.add_argument(
            flag,
            type=Path,
            action="append",
            default=[],
            help=f"folder of {what} (repeatable; also found beside --models-dir in an A1111 or ComfyUI installation)",
        )
    p.add_argument(
        "--styles-file",
        action="append",
        default=[],
        help="an A1111 styles.csv that requests' styles name (repeatable, wildcards allowed; default: the "
        "styles.csv of the A1111 installation around --models-dir)",
    )
    p.add_argument(
        "--api-auth",
        metavar="USER:PASS[,USER2:PASS2]",
        help="require HTTP Basic authentication with one of these users (for the API and the page)",
    )
    p.add_argument("-m", "--model", type=Path, help="the model loaded first (default: the bundled demo model)")
    p.add_argument(
        "--models-dir",
        type=Path,
        help="a folder of checkpoints (*.safetensors, *.ckpt, diffusers folders) that clients select by name",
    )
    p.add_argument(
        "--cors-allow-origins", metavar="ORIGIN[,ORIGIN2]", help="origins allowed to call the API from a browser"
    )
    p.add_argument("--queue-size", type=int, default=64, help="jobs waiting at most; more get 503 (default 64)")
    p.add_argument("--max-models", type=int, default=1, help="models kept loaded at once (default 1)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="queued jobs with the same model, size and sampler settings run as one batch of at most this many "
        "images (default 4; 1: each job alone)",
    )
    p.add_argument("--max-model-memory-mb", type=int, default=0, help="unload models beyond this many MB (0: off)")
    p.add_argument("--max-body-mb", type=float, default=64, help="largest request body in MB (default 64)")
    p.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="largest input image in pixels (default 4096x4096)"
    )
    p.add_argument(
        "--max-output-pixels",
        type=int,
        default=4096 * 4096,
        help="largest width x height x batch_size of one pass, after hires (default 4096x4096)",
    )
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="where save_images writes (default outputs/)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: automatic)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile each loaded model's UNet with torch.compile (CUDA graphs on a GPU): the first request of "
        "each size and batch waits for compiling, later ones run faster",
    )
    p.set_defaults(func=cmd_serve)


def parse_users(text: str | None) -> list[tuple[str, str]]:
    """``user:pass,user2:pass2`` -> [(user, pass), ...] (A1111's --api-auth format)."""
    users = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: {item.strip()!r} is not USER:PASS")
        users.append((user, password))
    return users


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"the server needs its extra packages ({', '.join(missing)} missing): pip install 'latentforge[server]'"
        )
    import uvicorn

    from latentforge.demo import bundled_model_path
    from latentforge.server.app import create_app
    from latentforge.server.jobs import ServerConfig

    model = args.model or (None if args.models_dir else bundled_model_path())
    if model is not None and not Path(model).exists():
        raise ValueError(f"-m/--model: {model} does not exist")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise ValueError(f"--models-dir: {args.models_dir} is not a folder")
    if model is None and args.models_dir is None:
        raise ValueError("no model: give -m/--model or --models-dir (this installation has no demo model)")
    for flag in ("lora_dir", "embeddings_dir", "hypernetwork_dir", "controlnet_dir"):
        for folder in getattr(args, flag):
            if not folder.is_dir():
                raise ValueError(f"--{flag.replace('_', '-')}: {folder} is not a folder")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be 1 or more, got {args.max_batch}")
    from latentforge import upscalers

    config = ServerConfig(
        model=model,
        models_dir=args.models_dir,
        outdir=args.outdir,
        queue_size=args.queue_size,
        max_models=args.max_models,
        max_batch=args.max_batch,
        max_model_bytes=args.max_model_memory_mb << 20,
        max_image_pixels=args.max_image_pixels,
        max_queued_pixels=2 * 8 * args.max_image_pixels,  # two requests with all their images at the limit
        max_output_pixels=args.max_output_pixels,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        upscaler_dirs=upscalers.search_dirs(near=args.models_dir / "x" if args.models_dir else model),
        controlnet_dirs=list(args.controlnet_dir),
        lora_dirs=list(args.lora_dir),
        embedding_dirs=list(args.embeddings_dir),
        hypernetwork_dirs=list(args.hypernetwork_dir),
        vae_dirs=list(args.vae_dir),
        styles_files=[Path(f) for f in args.styles_file],
    )
    origins = [o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()]
    app = create_app(config, users=parse_users(args.api_auth), cors_origins=origins)
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    print(f"latentforge: serving on http://{host}:{args.port}/ (A1111 API under /sdapi/v1)", file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
