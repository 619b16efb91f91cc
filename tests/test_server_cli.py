"""`latentforge serve`'s flags (A1111's): --listen binds 0.0.0.0, else 127.0.0.1 only; --api-auth users;
bad values are errors naming the flag. uvicorn.run is replaced, so nothing listens."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from latentforge.cli import main  # noqa: E402
from latentforge.cli_serve import parse_users  # noqa: E402


@pytest.fixture
def runs(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_bind_address_and_port(runs):
    assert main(["serve"]) == 0
    assert main(["serve", "--listen", "--port", "7999"]) == 0
    assert [(kw["host"], kw["port"]) for _, kw in runs] == [("127.0.0.1", 7860), ("0.0.0.0", 7999)]


def test_api_auth_users():
    assert parse_users("alice:pw,bob:a:b") == [("alice", "pw"), ("bob", "a:b")]
    assert parse_users(None) == []
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(ValueError, match="--api-auth"):
            parse_users(bad)


def test_bad_flags_are_errors_naming_them(runs, tmp_path, capsys):
    assert main(["serve", "--api-auth", "nopassword"]) == 2
    assert "--api-auth" in capsys.readouterr().err
    assert main(["serve", "-m", str(tmp_path / "missing.safetensors")]) == 2
    assert "-m/--model" in capsys.readouterr().err
    assert main(["serve", "--models-dir", str(tmp_path / "nope")]) == 2
    assert "--models-dir" in capsys.readouterr().err
    assert runs == []
