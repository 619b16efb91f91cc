"""The latentforge command line: inspect and convert."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from latentforge.cli import main
from tiny import build_reference, save_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(build_reference("sd2-v", seed=3), tmp_path_factory.mktemp("cli") / "model")


def test_inspect_reports_family_detection_and_components(folder, capsys):
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "family:      sd2-v" in out
    assert "prediction:  v (scheduler/scheduler_config.json prediction_type='v_prediction')" in out
    for part in ("unet", "vae", "text encoder openclip-h", "float32", "in_channels=4"):
        assert part in out


def test_convert_round_trip_and_no_silent_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(folder), str(out), "--to", "single-file", "--dtype", "fp16"]) == 0
    assert {str(t.dtype) for t in load_file(out).values()} <= {"torch.float16", "torch.int64"}
    before = out.read_bytes()
    assert main(["convert", str(folder), str(out), "--to", "single-file"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["convert", str(out), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert (tmp_path / "d" / "model_index.json").is_file()
    assert main(["inspect", str(out)]) == 0
    assert "file metadata latentforge.prediction='v'" in capsys.readouterr().out


def test_overwrite_replaces_only_a_model_folder_and_never_a_folder_with_a_file(folder, tmp_path, capsys):
    """--overwrite replaced any folder: a mistyped output wiped the user's files in it; and a single file
    over a folder was found only after the whole conversion."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("important")
    args = ["convert", str(folder), str(home), "--to", "diffusers", "--overwrite"]
    assert main(args) == 2
    assert "no diffusers model folder" in capsys.readouterr().err
    assert (home / "docs" / "thesis.txt").read_text() == "important"
    assert not (home / "model_index.json").exists()
    model = tmp_path / "model"
    model.mkdir()  # empty: replaced
    assert main(["convert", str(folder), str(model), "--to", "diffusers", "--overwrite"]) == 0
    assert main(["convert", str(folder), str(model), "--to", "diffusers", "--overwrite"]) == 0  # a model folder
    assert (model / "model_index.json").is_file()
    (tmp_path / "d.safetensors").mkdir()
    assert main(["convert", str(folder), str(tmp_path / "d.safetensors"), "--to", "single-file", "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err and (tmp_path / "d.safetensors").is_dir()


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentforge: error:") and "Traceback" not in err
