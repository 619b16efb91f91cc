"""``latentforge.load``: from a file or folder users have to a ready ``Pipeline``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from latentforge.convert.diffusers import vae_config_from_diffusers, vae_key_to_original
from latentforge.device import auto_dtype, parse_device, parse_dtype, to_fast_layout, vae_dtype
from latentforge.families import Family, get_family
from latentforge.families.detect import candidates, probe_prediction, resolve_prediction
from latentforge.families.infer import infer_vae_config
from latentforge.io.components import LoadError, Ref, build, check, identity_refs
from latentforge.io.diffusers_folder import DiffusersSource, vae_refs_diffusers
from latentforge.io.folder_files import open_component_weights, read_json
from latentforge.io.single_file import VAE_PREFIX, SingleFileSource
from latentforge.io.tensorfile import CheckpointError, open_tensor_file
from latentforge.models.clip import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNet
from latentforge.models.vae import AutoencoderKL, VAEConfig
from latentforge.pipeline import LoadInfo, Pipeline

log = logging.getLogger("latentforge")


def open_source(path: str | Path):
    path = Path(path)
    if path.is_dir():
        if (path / "unet" / "config.json").is_file():
            return DiffusersSource(path)
        raise CheckpointError(f"{path} is a folder but not a diffusers model folder (no unet/config.json)")
    if not path.exists() and not path.is_symlink():  # a broken or looping link: the reader says which
        raise CheckpointError(f"{path} does not exist")
    return SingleFileSource(path)


def load_vae(path: str | Path, family: Family, *, dtype: torch.dtype | None, device) -> AutoencoderKL:
    """A standalone VAE: original keys (with or without ``first_stage_model.``) or diffusers keys/folder.

    Refused (LoadError) when it cannot work with ``family``'s latents: other latent channels or another
    downscale factor than the family's VAE, or a file that declares another latent scale (a diffusers
    ``config.json`` ``scaling_factor``, or the ``latentforge.family`` metadata latentforge writes).
    """
    path = Path(path)
    f = open_component_weights(path) if path.is_dir() else open_tensor_file(path)
    try:
        keys = f.keys()
        declared: tuple[float, str] | None = None
        if any(k.startswith("encoder.down_blocks.") for k in keys):  # diffusers names
            folder = path if path.is_dir() else path.parent
            cfg_json = read_json(folder, "config.json") if (folder / "config.json").is_file() else {}
            if "block_out_channels" in cfg_json:
                try:
                    cfg = vae_config_from_diffusers(cfg_json)
                except CheckpointError as e:
                    raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
            else:
                levels = len({k.split(".")[2] for k in keys if k.startswith("encoder.down_blocks.")})
                cfg = _infer_vae({vae_key_to_original(k, levels): f.shape(k) for k in keys}, family, path)
            scale = cfg_json.get("scaling_factor")
            if isinstance(scale, (int, float)) and not isinstance(scale, bool):
                declared = (float(scale), f"scaling_factor in {folder / 'config.json'}")
            refs = vae_refs_diffusers(f, cfg)
        else:
            prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
            refs = identity_refs(f, prefix, [k for k in keys if k.startswith(prefix)])
            # VAE files often carry the training loss's weights; they are not part of the autoencoder
            refs = {k: r for k, r in refs.items() if not k.startswith(("loss.", "model_ema."))}
            shapes = {k: r.shape for k, r in refs.items()}
            cfg = _infer_vae(shapes, family, path)
        declared = _declared_family_scale(f.metadata, path) or declared
        check_vae_fits(cfg, family, str(path), declared)
        return _build_vae(cfg, refs, family, dtype, device, str(path))
    finally:
        f.close()


def _infer_vae(shapes: dict, family: Family, path: Path) -> VAEConfig:
    try:
        return infer_vae_config(shapes, family.vae)
    except CheckpointError as e:
        raise type(e)(f"{path}: VAE: {e}") from None


def _declared_family_scale(metadata: dict, path: Path) -> tuple[float, str] | None:
    """(latent scale, what said so) from the ``latentforge.family`` metadata of a file we wrote."""
    name = metadata.get("latentforge.family") if metadata else None
    if not name:
        return None
    try:
        fam = get_family(name)
    except KeyError:
        log.warning("%s: metadata names an unknown family %r; its latent scale is not checked", path, name)
        return None
    return fam.latent_scale, f"its metadata (latentforge.family = {name})"


def check_vae_fits(cfg: VAEConfig, family: Family, source: str, declared: tuple[float, str] | None = None) -> None:
    """Refuse a VAE that cannot encode/decode ``family``'s latents: other latent channels, another
    downscale factor, other image channels, or (when the file says) another latent scale.

    The SD1/SD2 and SDXL VAEs share one architecture and cannot be told apart by shapes; only a file that
    declares its scale (diffusers ``scaling_factor``, latentforge metadata) is checked for that.
    """
    want = family.vae
    problems = []
    if cfg.embed_dim != want.embed_dim:
        problems.append(f"{cfg.embed_dim} latent channels, the model's latents have {want.embed_dim}")
    if cfg.downscale != want.downscale:
        problems.append(f"downscale factor f={cfg.downscale}, the model's VAE has f={want.downscale}")
    if (cfg.in_channels, cfg.out_channels) != (want.in_channels, want.out_channels):
        problems.append(f"{cfg.in_channels}/{cfg.out_channels} image channels in/out, the model uses 3/3")
    if declared is not None and not math.isclose(declared[0], family.latent_scale, rel_tol=1e-3):
        problems.append(
            f"latent scale {declared[0]:g} ({declared[1]}), the model's ({family.name}) is {family.latent_scale:g}"
        )
    if problems:
        raise LoadError(
            f"the VAE {source} does not fit a {family.name} model: it has {'; '.join(problems)}. It was made for "
            f"another model family; use a VAE made for {family.name} (or the checkpoint's own, without --vae)"
        )


def check_all(plans, source: str) -> None:
    """Check (what, factory, refs) plans; one LoadError with the problems of every component."""
    problems = []
    for what, factory, refs in plans:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in factory().state_dict().items()}
        try:
            check(expected, refs, what, source)
        except LoadError as e:
            problems.append(str(e))
    if problems:
        raise LoadError("\n".join(problems))


def _build_vae(cfg: VAEConfig, refs: dict[str, Ref], family: Family, dtype, device, source: str) -> AutoencoderKL:
    return build(
        lambda: AutoencoderKL(cfg, family.latent_scale), refs, dtype=dtype, device=device, what="VAE", source=source
    )


def _tokenizer(source, spec, vocab_size: int) -> CLIPTokenizer:
    """The folder's tokenizer (else the bundled one); its ids must index the encoder's token embeddings."""
    folder = source.tokenizer_folder(spec)
    tok = CLIPTokenizer.from_folder(folder, pad_id=spec.pad_id) if folder else CLIPTokenizer(pad_id=spec.pad_id)
    top = max(max(tok.encoder.values()), tok.pad_id)
    if top >= vocab_size:
        raise CheckpointError(
            f"{folder or source.name}: token ids reach {top} but text encoder {spec.name} has only {vocab_size} "
            "token embeddings; the tokenizer does not belong to this model"
        )
    return tok


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    vae: str | Path | None = None,
    prediction: str | None = None,
    family: str | None = None,
    zero_terminal_snr: bool | None = None,
):
    """Load a Stable Diffusion checkpoint: a single ``.safetensors``/``.ckpt`` file or a diffusers folder.

    ``dtype`` (fp32, bf16, fp16) and ``device`` (default cpu) are applied while reading, one tensor at a
    time. ``dtype=None`` picks the fast path for the device (``latentforge.device.auto_dtype``: bf16 for
    full-size models on CPUs with AVX512-BF16/AMX, fp16 on CUDA, else fp32; ``LATENTFORGE_DTYPE``
    overrides it); ``pipe.info.dtype_reason`` says what decided. ``vae`` replaces the checkpoint's VAE
    with a standalone VAE file or folder. ``prediction`` ('eps' or 'v') overrides detection of the
    parameterisation; ``family`` forces a family (it must still fit the file's structure).
    ``zero_terminal_snr`` overrides what the file says about zero-terminal-SNR training (a ``ztsnr`` key,
    or ``rescale_betas_zero_snr`` in a diffusers scheduler config); such models sample on the rescaled
    schedule (``pipe.zero_terminal_snr``).
    """
    start = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    dtype_reason = f"explicit dtype={dtype!r}" if torch_dtype is not None else ""
    dev = parse_device(device)  # a clear ValueError for a device this machine lacks, before any file work
    source = open_source(path)
    try:
        sig = source.signature()
        found = candidates(sig, source.layout, source.name, forced=family)
        fam = found[0]
        reason = f"forced by family={family!r}" if family else f"structure matched {[f.name for f in found]}"
        ucfg, urefs = source.unet(fam)
        vcfg, vrefs = source.vae(fam)
        if vae is None:
            check_vae_fits(vcfg, fam, source.name)
        texts = [(spec, *source.text(spec)) for spec in fam.text]
        tokenizers = [_tokenizer(source, spec, tcfg.vocab_size) for spec, tcfg, _ in texts]  # before any weight
        # every component is checked before any weight is read, so one error lists every problem
        plans = [("UNet", lambda: UNet(ucfg), urefs)]
        if vae is None:
            plans.append(("VAE", lambda: AutoencoderKL(vcfg, fam.latent_scale), vrefs))
        plans += [(f"text encoder {spec.name}", lambda c=tcfg: CLIPTextModel(c), trefs) for spec, tcfg, trefs in texts]
        check_all(plans, source.name)
        if torch_dtype is None:
            torch_dtype, dtype_reason = auto_dtype(dev, sum(math.prod(r.shape) for r in urefs.values()))
        vdtype = vae_dtype(torch_dtype, fam.vae_fp16_safe, dev)

        hints = source.prediction_hints()  # before any weight is read: a bad scheduler config fails early
        unet = build(lambda: UNet(ucfg), urefs, dtype=torch_dtype, device=dev, what="UNet", source=source.name)
        fam, pred, pred_reason = resolve_prediction(found, prediction, hints, lambda: probe_prediction(unet))
        if fam.unet.upcast_attention != unet.config.upcast_attention:
            unet.set_upcast_attention(fam.unet.upcast_attention)
        to_fast_layout(unet)

        encoders = []
        for spec, tcfg, trefs in texts:
            what = f"text encoder {spec.name}"
            encoders.append(
                build(
                    lambda c=tcfg: CLIPTextModel(c), trefs, dtype=torch_dtype, device=dev, what=what, source=source.name
                )
            )

        vae_source = "checkpoint"
        if vae is None:
            vae_model = _build_vae(vcfg, vrefs, fam, vdtype, dev, source.name)
        else:
            vae_model = load_vae(vae, fam, dtype=vdtype, device=dev)
            vae_source = str(vae)
        to_fast_layout(vae_model, vae=True)
        extras, dropped = source.leftovers()
        ztsnr = zero_terminal_snr if zero_terminal_snr is not None else _says_zero_terminal_snr(source, extras)
    finally:
        source.close()
    if dropped:
        log.info(
            "%s: ignored %d tensors under %s (EMA copy; the weights under model.diffusion_model. run)",
            source.name,
            len(dropped),
            dropped[0].split(".")[0],
        )
    if extras:
        log.info(
            "%s: %d tensors outside the model components kept aside: %s",
            source.name,
            len(extras),
            ", ".join(list(extras)[:5]) + (" ..." if len(extras) > 5 else ""),
        )
    info = LoadInfo(
        source.name,
        source.layout,
        reason,
        pred_reason,
        vae_source,
        sorted(extras),
        dropped,
        time.perf_counter() - start,
        f"{str(torch_dtype).removeprefix('torch.')} ({dtype_reason})",
    )
    pipe = Pipeline(
        fam,
        pred,
        unet,
        vae_model,
        tuple(encoders),
        tuple(tokenizers),
        extras=extras,
        info=info,
        open_model=lambda other: open_like(other, dtype=torch_dtype, device=dev),
        open_vae=_vae_opener(path, fam, vdtype, dev),
    )
    pipe.zero_terminal_snr = ztsnr
    return pipe


def _says_zero_terminal_snr(source, extras: dict) -> bool:
    """Zero-terminal-SNR training, as the file says it: a ``ztsnr`` key (NoobAI-style v-prediction SDXL
    files) or a diffusers scheduler config with ``rescale_betas_zero_snr``."""
    if "ztsnr" in extras:
        return True
    folder = getattr(source, "path", None)
    if folder is not None and folder.is_dir() and (folder / "scheduler" / "scheduler_config.json").is_file():
        return bool(read_json(folder, "scheduler/scheduler_config.json").get("rescale_betas_zero_snr", False))
    return False


def _vae_opener(path: str | Path, family: Family, dtype: torch.dtype, device) -> Callable[[object], AutoencoderKL]:
    """How a pipeline loads another VAE (``Pipeline.set_vae``): a standalone VAE file or folder, or (None)
    the checkpoint's own again, in the dtype and on the device the pipeline's VAE was loaded with."""

    def open_vae(vae: str | Path | None) -> AutoencoderKL:
        if vae is not None:
            return to_fast_layout(load_vae(vae, family, dtype=dtype, device=device), vae=True)
        source = open_source(path)
        try:
            cfg, refs = source.vae(family)
            check_vae_fits(cfg, family, source.name)
            return to_fast_layout(_build_vae(cfg, refs, family, dtype, device, source.name), vae=True)
        finally:
            source.close()

    return open_vae


def open_like(path: str | Path, *, dtype: torch.dtype, device) -> tuple[Family, Callable[[], object]]:
    """Another checkpoint's family from key names and shapes (no weights read), and a function that loads it
    with this dtype and device: how a pipeline opens its refiner before and when it is needed."""
    source = open_source(path)
    try:
        family = candidates(source.signature(), source.layout, source.name)[0]
    finally:
        source.close()
    return family, lambda: load(path, dtype=dtype, device=device)


def inspect_checkpoint(path: str | Path, *, probe: bool = False) -> dict:
    """What a checkpoint holds, from key names and shapes only (no weights are read unless ``probe``
    must run the UNet to tell eps from v)."""
    source = open_source(path)
    try:
        sig = source.signature()
        found = candidates(sig, source.layout, source.name)
        fam = found[0]
        components = {}
        ucfg, urefs = source.unet(fam)
        parts = [("unet", urefs, ucfg)]
        vcfg, vrefs = source.vae(fam)
        parts.append(("vae", vrefs, vcfg))
        for spec in fam.text:
            tcfg, trefs = source.text(spec)
            parts.append((f"text encoder {spec.name}", trefs, tcfg))
        for name, refs, cfg in parts:
            dtypes = sorted({str(r.file.dtype(r.key)).removeprefix("torch.") for r in refs.values()})
            count = 0
            for r in refs.values():
                n = 1
                for s in r.shape:
                    n *= s
                count += n
            components[name] = {"parameters": count, "dtypes": dtypes, "config": cfg}
        hints = source.prediction_hints()
        if probe or len({f.prediction for f in found}) == 1 or hints:

            def run_probe():
                unet = build(
                    lambda: UNet(ucfg), urefs, dtype=torch.float32, device="cpu", what="UNet", source=source.name
                )
                return probe_prediction(unet)

            fam, pred, how = resolve_prediction(found, None, hints, run_probe)
        else:
            pred = "/".join(sorted({f.prediction for f in found}))
            how = "undecided from the file alone (eps and v variants share this structure); rerun with --probe"
        extras, dropped = ([], [])
        if isinstance(source, SingleFileSource):
            extras = [k for k in source.keys if k not in source._claimed and not k.startswith("model_ema.")]
            dropped = [k for k in source.keys if k.startswith("model_ema.")]
        return {
            "path": str(path),
            "layout": source.layout,
            "family": fam.name,
            "title": fam.title,
            "candidates": [f.name for f in found],
            "signature": sig,
            "prediction": pred,
            "prediction_reason": how,
            "default_size": fam.default_size,
            "latent_scale": fam.latent_scale,
            "components": components,
            "extras": extras,
            "dropped": dropped,
        }
    finally:
        source.close()
