"""The ``train`` and ``train-demo`` commands."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config (diffusion or VAE)")
    p.add_argument("config", type=Path, nargs="?", help="TOML file (see recipes/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", help="config overrides such as steps=100 data.path=/my/images")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "train-demo", help="train the bundled demo model from nothing (about an hour on 2 cores), or its adapters"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (default runs/demo)")
    p.add_argument("--install", action="store_true", help="copy the result into the package as the bundled model")
    p.add_argument(
        "--adapters",
        action="store_true",
        help="train the demo adapters (a star LoRA, a 'scarlet' embedding: recipes/demo_*_lora/_embedding.toml) "
        "on the bundled demo model instead of the model itself (about 10 and 30 minutes on 2 cores)",
    )
    p.add_argument("overrides", nargs="*", help="overrides for both stages, e.g. seed=1")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train_demo)


def _printer(quiet: bool, label: str):
    def report(p):
        if quiet:
            return
        if p.message and p.step == 0:  # a note before training (DreamBooth's class images)
            print(f"{label} {p.message}", file=sys.stderr, flush=True)
            return
        eta = (p.steps - p.step) * p.seconds / max(p.step, 1)
        print(
            f"{label} step {p.step}/{p.steps}  loss {p.loss:.4f}  lr {p.lr:.2e}  {p.samples_per_second:.1f} img/s  "
            f"elapsed {p.seconds / 60:.1f} min  left ~{eta / 60:.1f} min",
            file=sys.stderr,
            flush=True,
        )

    return report


def cmd_train(args: argparse.Namespace) -> int:
    from latentforge.train import load_config, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in str(config) and not str(config).endswith(".toml"):
        config, overrides = None, [str(args.config), *overrides]  # only overrides were given
    cfg = load_config(config, overrides)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports (train/distributed.py)
    try:
        out = train(cfg, _printer(args.quiet or not main_rank, cfg.mode))
    except KeyboardInterrupt:
        if main_rank:
            print(f"latentforge: interrupted; {interrupted_summary(Path(cfg.output))}", file=sys.stderr)
        return 130
    if main_rank:
        print(out)
    return 0


def interrupted_summary(out: Path) -> str:
    """What an interrupted run left in its output folder, and how to go on."""
    from latentforge.train.common import STATE_DIR, has_state

    written = sorted(p.name for p in out.glob("*.safetensors")) if out.is_dir() else []
    parts = []
    if has_state(out):
        try:
            step = json.loads((out / STATE_DIR / "state.json").read_text()).get("step", "?")
        except (OSError, ValueError, AttributeError):
            step = "?"
        parts.append(f"the training state of step {step} is saved in {out / STATE_DIR} (the same command resumes)")
    if written:
        parts.append(f"checkpoints written: {', '.join(written)} in {out}")
    return "; ".join(parts) if parts else "nothing was written"


def recipe(name: str) -> Path:
    return Path(str(resources.files("latentforge.recipes").joinpath(name)))


def cmd_train_demo(args: argparse.Namespace) -> int:
    """Both stages of the demo recipe, then a fp16 single file of the model."""
    import latentforge
    from latentforge.train import load_config, train

    if args.adapters:
        return train_demo_adapters(args)
    start = time.perf_counter()
    out = args.out
    try:
        vae_cfg = load_config(recipe("demo_vae.toml"), [f"output={_q(out / 'vae')}", *args.overrides])
        vae_file = train(vae_cfg, _printer(args.quiet, "vae"))
        unet_cfg = load_config(
            recipe("demo_unet.toml"), [f"output={_q(out / 'unet')}", f"model.vae={_q(vae_file)}", *args.overrides]
        )
        model = train(unet_cfg, _printer(args.quiet, "unet"))
    except KeyboardInterrupt:
        stages = [f"{stage}: {interrupted_summary(out / stage)}" for stage in ("vae", "unet")]
        print(f"latentforge: interrupted; {'; '.join(stages)}", file=sys.stderr)
        return 130
    demo = latentforge.load(model).save(out / "demo.safetensors", dtype="fp16", overwrite=True)
    print(f"{demo} ({demo.stat().st_size / 1e6:.1f} MB) in {(time.perf_counter() - start) / 60:.1f} min")
    if args.install:
        from latentforge.demo import DEMO_FILE

        target = Path(str(resources.files("latentforge.assets").joinpath(DEMO_FILE)))
        shutil.copyfile(demo, target)
        print(f"installed as {target}")
    return 0


# the demo adapters: (recipe, stage folder, subfolder of assets/demo, file the stage writes)
DEMO_ADAPTER_RECIPES = (
    ("demo_star_lora.toml", "star_lora", "lora", "demo_star.safetensors"),
    ("demo_scarlet_embedding.toml", "scarlet_embedding", "embeddings", "scarlet.safetensors"),
)


def train_demo_adapters(args: argparse.Namespace) -> int:
    """The demo adapters' recipes on the bundled demo model; with --install, copied into assets/demo/."""
    from latentforge.demo import DEMO_ADAPTERS, bundled_model_path
    from latentforge.train import load_config, train

    if bundled_model_path() is None:
        print("latentforge: no bundled demo model to train adapters on (train-demo --install)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = []
    for name, stage, kind, produced in DEMO_ADAPTER_RECIPES:
        cfg = load_config(recipe(name), [f"output={_q(args.out / stage)}", *args.overrides])
        try:
            train(cfg, _printer(args.quiet, stage))
        except KeyboardInterrupt:
            print(f"latentforge: interrupted; {stage}: {interrupted_summary(args.out / stage)}", file=sys.stderr)
            return 130
        results.append((args.out / stage / produced, kind))
    for path, _ in results:
        print(f"{path} ({path.stat().st_size / 1e3:.1f} kB)")
    print(f"in {(time.perf_counter() - start) / 60:.1f} min")
    if args.install:
        folder = Path(str(resources.files("latentforge.assets").joinpath(DEMO_ADAPTERS)))
        for path, kind in results:
            (folder / kind).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / kind / path.name)
            print(f"installed as {folder / kind / path.name}")
    return 0


def _q(path: Path) -> str:
    return json.dumps(str(path))
