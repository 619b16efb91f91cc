"""The request's networks: LoRAs from ``<lora:...>`` prompt tags and the ``networks`` group, applied for one
request and taken back afterwards; textual-inversion embeddings the prompts name; their infotext hashes.

A1111's tag ``<lora:name:te:unet>`` (``te`` default 1, ``unet`` default ``te``; named ``te=``/``unet=`` also
work) is cut out of the text sent to the text encoders; the infotext keeps the prompt as written, with
``Lora hashes: "name: <12 hex>"`` (the first 12 hex digits of the addnet hash, which is the SHA-256 of
a ``.safetensors`` file's tensor data, as A1111 writes) and ``TI hashes`` (12 hex digits of the SHA-256
of the embedding file, as A1111).

A tag's ``dyn`` (4th positional item or ``dyn=``, A1111's ``extra_networks_lora``) keeps the first ``dyn``
ranks of each LoRA/LoCon module (``adapters.lora_kinds``). Embeddings bundled in a LoRA file
(``bundle_emb.<name>.*``) are usable in the prompts while the LoRA is applied, unless an embedding of that
name is already known (A1111: the embeddings folder's wins) or they do not fit the model (left out
silently, as A1111 lists them as skipped); the infotext's TI hashes give the LoRA's name for them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.adapters.hypernetwork import apply_hypernetwork
from latentforge.adapters.lora import apply_lora
from latentforge.conditioning.embeddings import bundled_embedding
from latentforge.conditioning.prompt import extract_network_tags
from latentforge.io.hashing import sha256_of
from latentforge.pipelines.request import HIRES_NETWORKS, GenerationRequest, RequestError, hires_networks_differ
from latentforge.pipelines.request import HYPERNET_KINDS as HYPERNET_KINDS
from latentforge.pipelines.request import LORA_KINDS as LORA_KINDS
from latentforge.pipelines.request import refs_from_tags as refs_from_tags  # re-exported (tests, users)

EMBEDDING_KIND = "embedding"
log = logging.getLogger(__name__)


@dataclass
class Session:
    """What a request applied: patcher sources and embeddings to take back, and the infotext fields."""

    request: GenerationRequest  # with the tags cut out of the prompt
    sources: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    infotext: dict = field(default_factory=dict)

    def close(self, pipe) -> None:
        with pipe.patcher.batched():  # each weight recomputed once
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
    applied = pipe.applied_networks() if hasattr(pipe, "applied_networks") else []  # pipe.apply_lora
    for ref, digest in applied:
        (hypernets if ref.kind in HYPERNET_KINDS else hashes).append(f"{_hash_name(ref.name)}: {digest}")
    try:
        with pipe.patcher.batched():  # each weight recomputed once, not once per network that patches it
            _apply_refs(pipe, session, refs, applied, hashes, hypernets)
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
    ti = [f"{e.name}: {e.hash or sha256_of(e.path)[:12]}" for e in used if e.hash or e.path is not None]
    if ti:
        session.infotext["TI hashes"] = ", ".join(ti)
    return session


def _apply_refs(pipe, session: Session, refs: list, applied: list, hashes: list[str], hypernets: list[str]) -> None:
    """Apply each network reference (registering its patcher source in ``session`` first, so that an error
    takes back what was applied), collecting the LoRA and hypernetwork hashes."""
    for i, ref in enumerate(refs):
        if _already_applied(ref, applied):
            continue  # a record of an image made with it applied, run again while it still is
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
            hypernets.append(f"{_hash_name(ref.name)}: {sha256_of(path)[:12]}")
            continue
        if ref.kind not in LORA_KINDS:
            raise RequestError(
                f"networks of kind {ref.kind!r} are not available; use 'lora', 'hypernet' or 'embedding'"
            )
        path = pipe.folders.find_lora(ref.name)
        source = f"request:{i}:{ref.name}"
        session.sources.append(source)
        done = apply_lora(
            pipe, path, strength=ref.strength, text_strength=ref.text_strength, source=source, dyn=ref.dyn
        )
        hashes.append(f"{_hash_name(ref.name)}: {done.hash[:12]}")
        _add_bundled(pipe, session, done, _hash_name(ref.name))


def _add_bundled(pipe, session: Session, done, lora_name: str) -> None:
    """Make the embeddings bundled in an applied LoRA usable until the session closes (A1111's
    ``load_networks``): not one whose name is known already, nor one that does not fit the model."""
    known = pipe.text.embeddings.names()
    for name, tensors in done.bundled.items():
        emb = bundled_embedding(name, tensors, done.path, lora_name)
        if name.lower() in known:
            log.warning(
                "%s: bundled embedding %s skipped: an embedding of that name is already loaded", done.path, name
            )
            continue
        if emb.for_encoders(pipe.text.slots) is None:
            log.info("%s: bundled embedding %s does not fit this model's text encoders; skipped", done.path, name)
            continue
        pipe.text.embeddings.added[name] = emb
        session.embeddings.append(name)


def _hash_name(name: str) -> str:
    """A network's name in the infotext's hashes, as A1111 writes it (':' and ',' removed); a path is
    written by its file stem (A1111 names networks by stem, and the infotext never shows a path)."""
    if "/" in name or "\\" in name or Path(name).suffix.lower() in (".safetensors", ".pt", ".ckpt", ".bin", ".pth"):
        name = Path(name).stem
    return re.sub("[:,]", "", name)


def _already_applied(ref, applied: list) -> bool:
    """The request names a network by path that ``Pipeline.apply_lora``/``apply_hypernetwork`` applied with
    the same strengths: applying it again would double it (the JSON record lists those networks)."""
    if ref.kind not in (*LORA_KINDS, *HYPERNET_KINDS) or not applied:
        return False
    try:
        path = Path(ref.name).resolve()
    except (OSError, ValueError):
        return False
    return any(
        Path(a.name) == path
        and (a.kind in HYPERNET_KINDS) == (ref.kind in HYPERNET_KINDS)
        and a.strength == ref.strength
        and (a.text_strength == ref.text_strength or a.kind in HYPERNET_KINDS)
        for a, _ in applied
    )


def _hires_without_tags(req: GenerationRequest, tags: list) -> object:
    """The hires group with the network tags cut out of its own prompt. A1111 switches to the hires
    prompt's networks for the hires pass; here both passes run with the prompt's, so a hires prompt that
    names other networks (or none while the prompt names some) is refused. A hires prompt of tags alone
    is the empty prompt (a space: the empty string means "the prompt's")."""
    h = req.hires
    if h is None or not isinstance(h.prompt, str) or not h.prompt:
        return h
    if hires_networks_differ(req):
        raise RequestError(HIRES_NETWORKS)
    return dataclasses.replace(h, prompt=extract_network_tags(h.prompt)[0] or " ")
