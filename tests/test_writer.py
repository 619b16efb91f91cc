"""``io.writer.atomic_dir``: a folder written beside its target takes the target's place; nothing of the
user's is removed or replaced unasked, and the old content is never lost before the new is in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import latentforge.io.writer as writer
from latentforge.io.writer import OutputError, atomic_dir


def _tree(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(folder, text: str) -> None:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.txt").write_text(text)


def test_a_users_own_dot_old_files_and_folders_are_kept(tmp_path):
    """The old copy was moved to .NAME.old after deleting whatever had that name: a user's folder or
    file called .model.old was destroyed."""
    target = tmp_path / "model"
    _model(target, "old weights")
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "mine.txt").write_text("the user's own notes")
    (tmp_path / ".other.old").write_text("a file of the user's")
    with atomic_dir(target, overwrite=True) as tmp:
        _model(tmp, "new weights")
    assert _tree(tmp_path) == {
        ".model.old/mine.txt": "the user's own notes",
        ".other.old": "a file of the user's",
        "model/unet/weights.txt": "new weights",
    }
    # and with .model.old a file
    (tmp_path / ".model.old" / "mine.txt").unlink()
    (tmp_path / ".model.old").rmdir()
    (tmp_path / ".model.old").write_text("a file named like the old copy")
    with atomic_dir(target, overwrite=True) as tmp:
        _model(tmp, "newer weights")
    assert _tree(tmp_path)[".model.old"] == "a file named like the old copy"
    assert _tree(tmp_path)["model/unet/weights.txt"] == "newer weights"
    assert sorted(os.listdir(tmp_path)) == [".model.old", ".other.old", "model"]


def test_the_old_content_comes_back_when_the_new_cannot_take_its_place(tmp_path, monkeypatch):
    target = tmp_path / "model"
    _model(target, "old weights")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if str(src).endswith(".partial"):  # the new folder's rename into place
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(PermissionError), atomic_dir(target, overwrite=True) as tmp:
        _model(tmp, "new weights")
    monkeypatch.undo()
    assert len(calls) == 3  # old aside, new in (refused), old back
    assert _tree(tmp_path) == {"model/unet/weights.txt": "old weights"}
    assert os.listdir(tmp_path) == ["model"]  # nothing left behind


def test_when_the_old_content_cannot_come_back_the_error_says_where_it_is(tmp_path, monkeypatch):
    target = tmp_path / "model"
    _model(target, "old weights")
    real = os.replace
    seen = []

    def replace(src, dst):
        seen.append(src)
        if len(seen) > 1:  # the new folder's rename, then the way back
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with (
        pytest.raises(OutputError, match="previous content could not be moved back: it is in ") as e,
        atomic_dir(target, overwrite=True) as tmp,
    ):
        _model(tmp, "new weights")
    monkeypatch.undo()
    kept = Path(str(e.value).rsplit("it is in ", 1)[1])
    assert kept.parent.parent == tmp_path and kept.parent.name.startswith(".model.old.")
    assert (kept / "unet" / "weights.txt").read_text() == "old weights"


def test_without_overwrite_a_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(FileExistsError, match="appeared while writing"), atomic_dir(target) as tmp:
        _model(tmp, "new weights")
        _model(target, "another process's weights")
    assert _tree(tmp_path) == {"model/unet/weights.txt": "another process's weights"}
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(target):
        pass


def test_a_failure_while_writing_leaves_the_target_and_no_partial_folder(tmp_path):
    target = tmp_path / "model"
    _model(target, "old weights")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        _model(tmp, "half")
        raise RuntimeError("disk full")
    assert _tree(tmp_path) == {"model/unet/weights.txt": "old weights"}
    with atomic_dir(tmp_path / "fresh") as tmp:
        _model(tmp, "first")
    assert _tree(tmp_path / "fresh") == {"unet/weights.txt": "first"}
    assert sorted(os.listdir(tmp_path)) == ["fresh", "model"]


def test_an_empty_folder_made_after_the_last_check_is_not_replaced(tmp_path, monkeypatch):
    """A plain rename() replaces an empty folder at the target: one made by another process between the
    last existence check and the rename was silently taken over. renameat2(RENAME_NOREPLACE) refuses."""
    target = tmp_path / "model"
    monkeypatch.setattr(writer.os.path, "lexists", lambda p: False)  # every check ran before it appeared
    with pytest.raises(FileExistsError, match="appeared while writing"), atomic_dir(target) as tmp:
        _model(tmp, "new weights")
        target.mkdir()
        inode = target.stat().st_ino
    monkeypatch.undo()
    assert target.stat().st_ino == inode and os.listdir(target) == []  # the other process's folder, untouched
    assert os.listdir(tmp_path) == ["model"]  # and no partial folder left


def test_without_renameat2_a_folder_with_content_is_still_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_renameat2", lambda: None)  # macOS, old glibc
    target = tmp_path / "model"
    with pytest.raises(FileExistsError, match="appeared while writing"), atomic_dir(target) as tmp:
        _model(tmp, "new weights")
        _model(target, "another process's weights")
    assert _tree(tmp_path) == {"model/unet/weights.txt": "another process's weights"}
    with atomic_dir(tmp_path / "fresh") as tmp:
        _model(tmp, "first")
    assert _tree(tmp_path / "fresh") == {"unet/weights.txt": "first"}


def test_safetensors_with_non_ascii_names_are_byte_for_byte_the_safetensors_librarys(tmp_path):
    """The header was written with JSON's \\u escapes: readable, but not the bytes the safetensors library
    writes for the same tensors (UTF-8), so the same weights saved by both tools differed."""
    import safetensors.torch
    import torch

    from latentforge.io.tensorfile import open_tensor_file
    from latentforge.io.writer import write_safetensors

    tensors = {"naïve.ß.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    metadata = {"title": "Ünïcode ✓ 猫"}  # one key: the library orders several by a hash map
    path = write_safetensors(tensors, tmp_path / "x.safetensors", metadata=metadata)
    assert path.read_bytes() == safetensors.torch.save(tensors, metadata=metadata)
    f = open_tensor_file(path)  # and latentforge reads its own file back
    assert list(f.keys()) == ["naïve.ß.weight"] and f.metadata == metadata
    with pytest.raises(ValueError, match=r"not valid Unicode .* rename it"):
        write_safetensors({"bad\udcff": tensors["naïve.ß.weight"]}, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists() and os.listdir(tmp_path) == ["x.safetensors"]


def test_names_are_counted_in_bytes_and_dangling_links_are_taken_names(tmp_path, monkeypatch, capsys):
    """The temporary name beside a target took its first 200 characters: 80 CJK characters (240 bytes, a
    valid name) made a 262-byte temporary name, refused by the file system after the whole generation.
    A dangling symbolic link as the target passed the up-front check and was refused only at the end."""
    from latentforge.cli import main
    from latentforge.io.writer import atomic_path

    name = tmp_path / ("画" * 80 + ".png")  # 244 bytes
    with atomic_path(name) as tmp:
        tmp.write_bytes(b"image")
    assert name.read_bytes() == b"image" and os.listdir(tmp_path) == [name.name]
    with (
        pytest.raises(OutputError, match="the file name is 304 bytes, more than file systems take"),
        atomic_path(tmp_path / ("画" * 100 + ".png")),
    ):
        raise AssertionError("not reached: refused before any work")
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "nowhere.png")
    loads = []
    monkeypatch.setattr("latentforge.load", lambda *a, **k: loads.append(a))  # must not get this far
    assert main(["txt2img", "a red circle", "-o", str(link)]) != 0
    assert "already exists" in capsys.readouterr().err and loads == []
    assert link.is_symlink() and not (tmp_path / "nowhere.png").exists()
    assert main(["txt2img", "a red circle", "-o", str(tmp_path / ("画" * 100 + ".png"))]) != 0
    assert "304 bytes" in capsys.readouterr().err and loads == []
