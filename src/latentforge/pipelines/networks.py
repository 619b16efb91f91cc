"""The request's networks: LoRAs from ``<lora:...>`` prompt tags and the ``networks`` group, applied for one
request and taken back afterwards; textual-inversion embeddings the prompts name; their infotext hashes.

A1111's tag ``<lora:name:te:unet>`` (``te`` default 1, ``unet`` default ``te``; named ``te=``/``unet=`` also
work) is cut out of the text sent to the text encoders; the infotext keeps the prompt as written, with
``Lora hashes: "name: <12 hex>"`` (the first 12 hex digits of the addnet hash, which is the SHA-256 of
a ``.safetensors`` file's tensor data, as A1111 writes) and ``TI hashes`` (12 hex digits of the SHA-256
of the embedding file, as A1111).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.adapters.hypernetwork import apply_hypernetwork
from latentforge.adapters.lora import apply_lora
from latentforge.conditioning.prompt import extract_network_tags
from latentforge.io.hashing import sha256_of
from latentforge.pipelines.request import HYPERNET_KINDS as HYPERNET_KINDS
from latentforge.pipelines.request import LORA_KINDS as LORA_KINDS
from latentforge.pipelines.request import GenerationRequest, RequestError
from latentforge.pipelines.request import refs_from_tags as refs_from_tags  # re-exported (tests, users)

EMBEDDING_KIND = "embedding"


@dataclass
class Session:
    """What a request applied: patcher sources and embeddings to take back, and the infotext fields."""

    request: GenerationRequest  # with the tags cut out of the prompt
    sources: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    infotext: dict = field(default_factory=dict)

    def close(self, pipe) -> None:
        for source in self.sources:
            pipe.patcher.remove(source)
        for name in self.embeddings:
            pipe.text.embeddings.added.pop(name, None)
        self.sources, self.embeddings = [], []


def activate(pipe, req: GenerationRequest) -> Session:
    """Apply the request's LoRAs and embeddings; on any error everything applied so far is taken back."""
    prompt, tags = extract_network_tags(req.prompt)
    refs = [*req.networks, *refs_from_tags(tags)]
    session = Session(dataclasses.replace(req, prompt=prompt, networks=[], hires=_hires_without_tags(req, tags)))
    hashes, hypernets = [], []
    for ref, digest in pipe.applied_networks() if hasattr(pipe, "applied_networks") else ():  # pipe.apply_lora
        entry = f"{re.sub('[:,]', '', Path(ref.name).stem)}: {digest}"
        (hypernets if ref.kind in HYPERNET_KINDS else hashes).append(entry)
    try:
        for i, ref in enumerate(refs):
            if ref.kind == EMBEDDING_KIND:
                path = pipe.folders.find_embedding(ref.name)
                pipe.text.embeddings.add(path)
                session.embeddings.append(path.stem)
                continue
            if ref.kind in HYPERNET_KINDS:
                path = pipe.folders.find_hypernetwork(ref.name)
                source = f"request:{i}:{ref.name}"
                session.sources.append(source)
                apply_hypernetwork(pipe, path, strength=ref.strength, source=source)
                hypernets.append(f"{re.sub('[:,]', '', ref.name)}: {sha256_of(path)[:12]}")
                continue
            if ref.kind not in LORA_KINDS:
                raise RequestError(
                    f"networks of kind {ref.kind!r} are not available; use 'lora', 'hypernet' or 'embedding'"
                )
            path = pipe.folders.find_lora(ref.name)
            source = f"request:{i}:{ref.name}"
            session.sources.append(source)
            applied = apply_lora(pipe, path, strength=ref.strength, text_strength=ref.text_strength, source=source)
            hashes.append(f"{re.sub('[:,]', '', ref.name)}: {applied.hash[:12]}")
    except BaseException:
        session.close(pipe)
        raise
    if hashes:
        session.infotext["Lora hashes"] = ", ".join(hashes)
    if hypernets:
        session.infotext["Hypernet hashes"] = ", ".join(hypernets)
    texts = [prompt, req.negative_prompt]
    if session.request.hires is not None:
        texts += [session.request.hires.prompt, session.request.hires.negative_prompt]
    used = pipe.text.embeddings.find("\n".join(texts), pipe.text.slots)
    ti = [f"{e.name}: {sha256_of(e.path)[:12]}" for e in used if e.path is not None]
    if ti:
        session.infotext["TI hashes"] = ", ".join(ti)
    return session


def _hires_without_tags(req: GenerationRequest, tags: list) -> object:
    """The hires group with the network tags cut out of its own prompt. A1111 switches to the hires
    prompt's networks for the hires pass; here both passes run with the prompt's, so a hires prompt that
    names other networks (or none while the prompt names some) is refused."""
    h = req.hires
    if h is None or not isinstance(h.prompt, str) or not h.prompt:
        return h
    text, own = extract_network_tags(h.prompt)
    if sorted(map(repr, refs_from_tags(own))) != sorted(map(repr, refs_from_tags(tags))):
        raise RequestError(
            "hr_prompt names other networks (<lora:...>, <hypernet:...>) than the prompt; switching networks "
            "between the passes is not available: put the same tags in both prompts, or leave hr_prompt empty"
        )
    return dataclasses.replace(h, prompt=text)
