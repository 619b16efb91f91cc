"""ComfyUI workflow graphs for the tests that read them back (test_formats.py, test_comfy_noise.py).

The graph is ComfyUI's default txt2img workflow in its API format: the JSON that ComfyUI writes into the
"prompt" text chunk of its PNGs, node id -> {"class_type", "inputs"}, an input that comes from another node
written as [node id, output index]. Node ids and links are those of ComfyUI's default graph.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin


def comfy_txt2img(
    *,
    ckpt: str,
    positive: str,
    negative: str,
    seed: int,
    steps: int,
    cfg: float,
    width: int,
    height: int,
    batch: int = 1,
    sampler: str = "euler",
    scheduler: str = "normal",
) -> dict:
    """ComfyUI's default txt2img graph (checkpoint loader, two CLIPTextEncode, EmptyLatentImage, KSampler,
    VAEDecode, SaveImage) with these values."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


# ComfyUI's default graph as it ships (its checkpoint, prompts, seed, steps and size)
DEFAULT_GRAPH = dict(
    ckpt="v1-5-pruned-emaonly.safetensors",
    positive="beautiful scenery",
    negative="text, watermark",
    seed=156680208700286,
    steps=20,
    cfg=8,
    width=512,
    height=768,
)


def comfy_png(path: Path, graph: dict, *, workflow: dict | None = None, size: tuple[int, int] = (8, 8)) -> Path:
    """A black PNG at ``path`` carrying ``graph`` as ComfyUI does (the "prompt" chunk; the editor's
    "workflow" chunk too when given)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    Image.new("RGB", size).save(path, pnginfo=info)
    return path
