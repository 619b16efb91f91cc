"""Reading ComfyUI's PNG metadata: the ``prompt`` text chunk holds the executed graph in ComfyUI's API
format, ``{node id: {"class_type": ..., "inputs": {name: value or [source node id, output index]}}}``.

From the common KSampler graphs (KSampler or KSamplerAdvanced fed by CLIPTextEncode / CLIPTextEncodeSDXL,
EmptyLatentImage and CheckpointLoaderSimple) this recovers prompt, negative prompt, seed, sampler,
scheduler, steps, CFG, size, batch size, denoise and the model name. ComfyUI's conventions are set on
the request: pure-noise starts scaled by sqrt(1 + sigma^2), integer timesteps, and the whole batch's
noise from one generator seeded with the seed (rng "comfy batch", sampling/noise.py), so every image
of a batch is reproduced, not only the first. A seed that cannot be read (missing, not a whole number,
out of range, linked to a node that is not a seed) is an error, never a random seed (``_seed``).
"""

from __future__ import annotations

import math

from latentforge.pipelines.checks import is_int, show
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.sampling.noise import COMFY_BATCH, MAX_SEED

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
SEED_INPUTS = ("seed", "noise_seed", "value", "int")  # of the nodes that pass a seed on
TEXT_INPUTS = ("text", "text_g", "text_l", "string", "value")


def _node(graph: dict, ref) -> dict | None:
    if isinstance(ref, list) and ref and str(ref[0]) in graph:
        node = graph[str(ref[0])]
        return node if isinstance(node, dict) else None
    return None


def _value(graph: dict, value, depth: int = 0):
    """A literal input, or the literal a linked node passes on (primitive and string nodes)."""
    if not isinstance(value, list) or depth > 16:
        return value
    node = _node(graph, value)
    if node is None:
        return None
    inputs = node.get("inputs", {})
    for key in (*TEXT_INPUTS, "seed", "noise_seed", "int", "float"):
        if key in inputs:
            return _value(graph, inputs[key], depth + 1)
    return None


def _text(graph: dict, ref, depth: int = 0) -> str:
    """The prompt text behind a conditioning input (through conditioning combine/concat nodes)."""
    node = _node(graph, ref)
    if node is None or depth > 16:
        return ""
    inputs = node.get("inputs", {})
    for key in TEXT_INPUTS:
        if key in inputs:
            text = _value(graph, inputs[key])
            return text if isinstance(text, str) else ""
    for key in ("conditioning", "conditioning_1", "conditioning_to"):
        if key in inputs:
            return _text(graph, inputs[key], depth + 1)
    return ""


def _follow(graph: dict, ref, key: str, depth: int = 0, seen: set | None = None):
    """The first node upstream of ``ref`` (following its first linked inputs) that has input ``key``.
    Each node is searched once (``seen``): a graph from a file can link every node to the next twice,
    which would otherwise take 2^depth steps."""
    seen = set() if seen is None else seen
    node = _node(graph, ref)
    if node is None or depth > 32 or str(ref[0]) in seen:
        return None
    seen.add(str(ref[0]))
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        return None
    if key in inputs:
        return node
    for value in inputs.values():
        if isinstance(value, list):
            found = _follow(graph, value, key, depth + 1, seen)
            if found is not None:
                return found
    return None


def _unreadable(message: str) -> RequestError:
    return RequestError(f"{message}; the image cannot be reproduced from this graph (run without --from)")


def _seed(graph: dict, node: dict, inputs: dict) -> int:
    """The seed the sampler ran with: its ``seed`` (KSampler) or ``noise_seed`` (KSamplerAdvanced) input, a
    literal or a link to a node that passes a seed on (a primitive or seed node: its ``seed``,
    ``noise_seed``, ``value`` or ``int`` input). The prompt graph holds the values that ran: ComfyUI's
    "control after generate" (fixed, increment, decrement, randomize) is an editor widget, kept only in the
    "workflow" chunk and applied to the widget before or after queueing, never sent as the seed. So a seed
    that cannot be read has no legitimate meaning, and is a RequestError rather than a random seed."""
    name = "seed" if "seed" in inputs else "noise_seed"
    where = f"{node.get('class_type')} input {name!r}"
    value, seen = inputs.get(name), set()
    while isinstance(value, list) and value:  # [node id, output index]
        source = _node(graph, value)
        label = f"node {str(value[0])[:40]!r}"
        if source is None:
            raise _unreadable(f"{where} links to {label}, which is not in the graph")
        kind = str(source.get("class_type"))[:60]
        given = source.get("inputs")
        key = next((k for k in SEED_INPUTS if k in given), None) if isinstance(given, dict) else None
        if str(value[0]) in seen:
            raise _unreadable(f"{where} links to {label} again: the seed's links go round in a circle")
        if key is None:
            raise _unreadable(
                f"{where} links to {label} ({kind}), which is not a seed: it has no input "
                f"{', '.join(SEED_INPUTS)} to read the seed from"
            )
        seen.add(str(value[0]))
        where, value = f"{label} ({kind}) input {key!r}", given[key]
    if value is None:
        raise _unreadable(f"{where}: the sampler has no seed; ComfyUI records the seed that ran")
    if not is_int(value) or not 0 <= value <= MAX_SEED:  # ComfyUI's KSampler: INT from 0 to 0xffffffffffffffff
        raise _unreadable(f"{where}: a seed is a whole number from 0 to 2^64 - 1 in ComfyUI, got {show(value)}")
    return value


def request_from_comfy(graph: dict) -> tuple[GenerationRequest, dict]:
    """The request of a ComfyUI prompt graph; RequestError when it has no sampler node to read."""
    samplers = [n for n in graph.values() if isinstance(n, dict) and n.get("class_type") in SAMPLER_NODES]
    if not samplers:
        raise RequestError("the ComfyUI graph has no KSampler or KSamplerAdvanced node to read settings from")
    node = samplers[0]
    inputs = node.get("inputs", {})
    req = GenerationRequest(
        prompt=_text(graph, inputs.get("positive")),
        negative_prompt=_text(graph, inputs.get("negative")),
        sgm_noise_multiplier=True,
        quantize_timesteps=True,
        rng=COMFY_BATCH,
    )
    req.seed = _seed(graph, samplers[0], inputs)
    steps, cfg = _value(graph, inputs.get("steps")), _value(graph, inputs.get("cfg"))
    if isinstance(steps, float) and not (math.isfinite(steps) and steps.is_integer()):
        # json.loads reads Infinity and NaN: int() of them would raise OverflowError/ValueError
        raise _unreadable(f"{node.get('class_type')} input 'steps': steps must be a whole number, got {show(steps)}")
    if isinstance(steps, (int, float)):
        req.steps = int(steps)
    if isinstance(cfg, (int, float)):
        req.cfg_scale = float(cfg)  # a non-finite one is refused by the request's own check
    sampler, scheduler = _value(graph, inputs.get("sampler_name")), _value(graph, inputs.get("scheduler"))
    if isinstance(sampler, str):
        req.sampler = sampler
    if isinstance(scheduler, str):
        req.schedule = scheduler
    latent = _follow(graph, inputs.get("latent_image"), "width")
    if latent is not None:
        size = latent["inputs"]
        req.width, req.height = _value(graph, size.get("width")), _value(graph, size.get("height"))
        batch = _value(graph, size.get("batch_size", 1))
        req.batch_size = batch if isinstance(batch, int) else 1
    denoise = _value(graph, inputs.get("denoise", 1.0))
    mode = "txt2img"
    if isinstance(denoise, (int, float)) and denoise < 1.0:
        req.denoising_strength, mode = float(denoise), "img2img"
    loader = _follow(graph, inputs.get("model"), "ckpt_name")
    model = {"name": loader["inputs"].get("ckpt_name") if loader else None, "hash": None}
    # ComfyUI records no image's place in its batch: with several, --from makes and keeps them all
    index = 0 if req.batch_size == 1 else None
    return req, {"mode": mode, "model": model, "source": "comfyui", "batch_index": index}
