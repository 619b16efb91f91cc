"""Hostile diffusers folders: entries and links leading outside the folder, absurd config values,
damaged tokenizer files. Each case ends quickly in a CheckpointError naming the entry or key, or in a
documented success (shards inside the folder, the Hugging Face cache layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentforge
from hostile import bounded, copy_folder, make_model, refused
from latentforge.cli import main
from latentforge.families.detect import DetectionError
from latentforge.loading import inspect_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fuzz_model"))


def _shard_index(folder: Path, weight_map: dict) -> None:
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("entry", ["../../outside.safetensors", "/etc/passwd", "..\\outside.safetensors", "C:/x"])
def test_shard_index_entry_leaving_the_folder_is_refused(model, tmp_path, entry):
    folder = copy_folder(model, tmp_path)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "outside.safetensors")
    _shard_index(folder, {"conv_in.weight": entry})
    err = refused(latentforge.load, folder, match="which is not a path inside the folder")
    assert "weight_map entry" in str(err) and repr(entry) in str(err)


def test_shards_inside_the_folder_load_and_overlapping_shards_are_refused(model, tmp_path):
    folder = copy_folder(model, tmp_path)
    sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, folder / "unet" / "a.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, folder / "unet" / "b.safetensors")
    _shard_index(folder, {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(keys)})
    kind, pipe = bounded(latentforge.load, folder)  # a documented success
    assert kind == "ok" and torch.equal(pipe.unet.state_dict()["out.2.bias"], sd["conv_out.bias"])
    save_file({k: sd[k] for k in keys[half - 1 :]}, folder / "unet" / "b.safetensors")
    refused(latentforge.load, folder, match="is in two shards")


@pytest.mark.parametrize("what", ["weights", "config", "component folder", "tokenizer", "dangling"])
def test_symlinks_leaving_the_folder_are_refused(model, tmp_path, what):
    folder = copy_folder(model, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "component folder":
        shutil.move(folder / "unet", outside / "unet")
        (folder / "unet").symlink_to(outside / "unet")
        name = "unet/config.json"
    else:
        name = {
            "weights": "unet/diffusion_pytorch_model.safetensors",
            "config": "vae/config.json",
            "tokenizer": "tokenizer/vocab.json",
            "dangling": "text_encoder/model.safetensors",
        }[what]
        shutil.move(folder / name, outside / "f")
        (folder / name).symlink_to(outside / ("missing" if what == "dangling" else "f"))
    refused(latentforge.load, folder, match="leads outside the folder")


def test_hub_cache_links_into_its_blobs_load(model, tmp_path):
    """The Hugging Face cache keeps snapshot files as links to ../../blobs/<hash>: a documented success."""
    repo = tmp_path / "models--test--tiny"
    snap = repo / "snapshots" / "0123abc"
    shutil.copytree(model["folder"], snap)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in snap.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(f, blob)
        f.symlink_to(Path("../" * len(f.relative_to(repo).parts[1:-1]) + "../blobs") / blob.name)
    kind, pipe = bounded(latentforge.load, snap)
    assert kind == "ok", str(pipe)
    assert pipe.family.name == "sd1"


CONFIGS = [
    ("unet", "layers_per_block", 100000, "'layers_per_block' is 100000, above latentforge's limit of 16"),
    ("unet", "block_out_channels", [0, 64, 64, 64], "'block_out_channels'[0] is 0; it must be at least 1"),
    ("unet", "block_out_channels", [-32, 64, 64, 64], "'block_out_channels'[0] is -32"),
    ("unet", "block_out_channels", "abc", "'block_out_channels' is 'abc'; it must be a list"),
    ("unet", "block_out_channels", [32] * 100, "the length of 'block_out_channels' (levels) is 100"),
    ("unet", "block_out_channels", [32, 48, 64, 64], "'block_out_channels'[1] = 48 is not a multiple"),
    ("unet", "attention_head_dim", 0, "'attention_head_dim'[0] is 0"),
    ("unet", "norm_num_groups", 0, "'norm_num_groups' is 0"),
    ("unet", "norm_num_groups", 7, "not a multiple of 7 norm groups"),
    ("unet", "transformer_layers_per_block", 10**9, "above latentforge's limit of 64"),
    ("unet", "down_block_types", ["DownBlock2D"] * 3, "'down_block_types' has 3 entries for 4 levels"),
    ("unet", "cross_attention_dim", 1.5, "'cross_attention_dim' is 1.5; it must be an integer"),
    ("unet", "in_channels", 10**12, "'in_channels' is 1000000000000, above latentforge's limit of 1024"),
    ("unet", "block_out_channels", None, "'block_out_channels' is None"),
    ("unet", "layers_per_block", True, "'layers_per_block' is True; it must be an integer"),
    ("vae", "latent_channels", 0, "'latent_channels' is 0"),
    ("vae", "layers_per_block", -1, "'layers_per_block' is -1"),
    ("text_encoder", "num_hidden_layers", 100000, "'num_hidden_layers' is 100000, above latentforge's limit of 256"),
    ("text_encoder", "hidden_size", 0, "'hidden_size' is 0"),
    ("text_encoder", "num_attention_heads", 3, "not a multiple of 3 heads"),
    ("text_encoder", "hidden_act", "relu", "text encoders ['text_encoder:relu']"),  # detection names it
    ("text_encoder", "layer_norm_eps", -1, "layer_norm_eps is -1"),
    ("scheduler", "prediction_type", 5, "prediction_type is 5"),
]


@pytest.mark.parametrize(("component", "key", "value", "message"), CONFIGS)
def test_absurd_config_values_are_refused_by_key(model, tmp_path, component, key, value, message):
    folder = copy_folder(model, tmp_path)
    path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    err = refused(inspect_checkpoint, folder, match=message)  # inspect reads configs, not weights
    if not isinstance(err, DetectionError):
        assert str(path) in str(err) and "\n" not in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "holds a JSON list, not an object"), ("{", "is not valid JSON"), ("[" * 10**5, "not valid JSON")],
)
def test_config_files_that_are_not_json_objects(model, tmp_path, text, message, capsys):
    folder = copy_folder(model, tmp_path)
    (folder / "unet" / "config.json").write_text(text)
    refused(latentforge.load, folder, match=message)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("vocab.json", "[1, 2]", "is not a CLIP vocabulary"),
        ("vocab.json", '{"<|startoftext|>": 0, "<|endoftext|>": 1, "a": "x"}', "is not a CLIP vocabulary"),
        ("vocab.json", '{"<|startoftext|>": 0, "<|endoftext|>": 99999}', "token ids reach 99999 but text encoder"),
        ("merges.txt", "#version: 0.2\na b c\n", "merge 1 is not two tokens"),
        ("vocab.json", "\udcff", "cannot read the tokenizer files"),
    ],
)
def test_hostile_tokenizer_files(model, tmp_path, name, text, message):
    folder = copy_folder(model, tmp_path)
    (folder / "tokenizer" / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(latentforge.load, folder, match=message)


def test_index_naming_too_many_shards(model, tmp_path):
    folder = copy_folder(model, tmp_path)
    _shard_index(folder, {f"t{i}": f"s{i}.safetensors" for i in range(1025)})
    refused(latentforge.load, folder, match="lists 1025 shard files, more than latentforge's limit of 1024")
