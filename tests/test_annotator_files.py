"""models/annotator_files.py, what hed_load.py and midas_load.py share: the first place found, in order, or an
error naming no place (they are logged); a file's unused tensors named (8 at most, the rest counted)."""

from __future__ import annotations

import pytest

from latentforge.io.tensorfile import CheckpointError
from latentforge.models.annotator_files import first_found, refuse_extra_tensors


class _Missing(FileNotFoundError):
    pass


def test_first_found_is_the_first_accepted_place_in_order(tmp_path):
    a, b, c = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c"
    b.write_bytes(b"x")
    c.mkdir()
    (tmp_path / "c.pth").write_bytes(b"x")
    assert first_found([a, b, tmp_path / "c.pth"], what="w", how_to_get="h", error=_Missing) == b
    # a folder is not a file unless the caller says what counts
    assert first_found([a, c, b], what="w", how_to_get="h", error=_Missing) == b
    assert first_found([a, c, b], what="w", how_to_get="h", error=_Missing, found=lambda p: p.exists()) == c


def test_nothing_found_says_how_to_get_it_and_logs_the_places(tmp_path, caplog):
    """The message reaches HTTP clients of the server: it names no folder of the machine; the places looked
    in go to the log, in order."""
    places = [tmp_path / "x" / "one.pth", tmp_path / "two.pth"]
    with caplog.at_level("INFO", logger="latentforge.models.annotator_files"), pytest.raises(_Missing) as e:
        first_found(places, what="edge model", how_to_get="Download it.", error=_Missing)
    assert str(e.value) == "the edge model was not found (latentforge -v logs the folders searched). Download it."
    assert f"looked in: {places[0]}, {places[1]}" in caplog.text
    with pytest.raises(_Missing, match=r"the depth model was not found .*\. Get it"):
        first_found([], what="depth model", how_to_get="Get it", error=_Missing)


def test_extra_tensors_are_named_eight_at_most():
    refuse_extra_tensors("f.pth", [], what="HED", layout="keras", advice="Use another.")  # nothing extra: no error
    with pytest.raises(CheckpointError) as e:
        refuse_extra_tensors("f.pth", ["a", "b"], what="HED", layout="keras", advice="Use another.")
    assert str(e.value) == "f.pth has tensors that are not part of HED (keras layout): a, b. Use another."
    names = [f"t{i:02d}" for i in range(11)]
    with pytest.raises(CheckpointError) as e:
        refuse_extra_tensors("m.pt", names, what="MiDaS", layout="original", advice="Damaged?")
    listed = "t00, t01, t02, t03, t04, t05, t06, t07 and 3 more"
    assert str(e.value) == f"m.pt has tensors that are not part of MiDaS (original layout): {listed}. Damaged?"
