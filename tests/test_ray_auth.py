"""The Ray auth token `wsss services up` starts its head with: found in Ray's order of precedence,
created only where none exists, never overwritten. Fast: no Ray head is started here (the whole
path, from an empty HOME to a finished job, is in test_cluster_e2e.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.ray_auth import TOKEN_ENV, TOKEN_PATH_ENV, RayTokenError, ensure_ray_token

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_an_empty_home_gets_a_default_token_from_ray_itself(home: Path):
    token = ensure_ray_token({}, ray_bin=RAY)
    path = home / ".ray" / "auth_token"
    assert token.created and token.path == path.resolve()
    assert len(path.read_text().strip()) == 64  # `ray get-auth-token --generate`: 256 bits in hex
    assert path.stat().st_mode & 0o077 == 0
    assert token.env() == {TOKEN_PATH_ENV: str(path.resolve())}


def test_an_existing_default_token_is_kept_as_it_is(home: Path):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("the-token-of-my-other-cluster\n")
    token = ensure_ray_token({}, ray_bin="/nonexistent/ray")  # never asked to generate
    assert not token.created and token.path == path.resolve()
    assert path.read_text() == "the-token-of-my-other-cluster\n"


def test_a_token_in_the_environment_wins_and_nothing_is_written(home: Path, tmp_path: Path):
    token = ensure_ray_token({TOKEN_ENV: "abc", TOKEN_PATH_ENV: str(tmp_path / "unused")}, ray_bin="/nonexistent")
    assert token.path is None and token.env() == {} and "RAY_AUTH_TOKEN" in token.describe()
    assert not (tmp_path / "unused").exists() and not (home / ".ray").exists()


def test_a_token_path_that_does_not_exist_yet_is_created_there_and_only_there(home: Path, tmp_path: Path):
    target = tmp_path / "secrets" / "ray-token"
    token = ensure_ray_token({TOKEN_PATH_ENV: str(target)}, ray_bin="/nonexistent")
    assert token.created and token.path == target.resolve()
    first = target.read_text()
    assert len(first) == 64 and target.stat().st_mode & 0o777 == 0o600
    assert not (home / ".ray").exists()
    again = ensure_ray_token({TOKEN_PATH_ENV: str(target)}, ray_bin="/nonexistent")
    assert not again.created and target.read_text() == first


def test_an_existing_token_path_is_never_overwritten(home: Path, tmp_path: Path):
    target = tmp_path / "mine"
    target.write_text("keep-me")
    assert not ensure_ray_token({TOKEN_PATH_ENV: str(target)}).created
    assert target.read_text() == "keep-me"


def test_an_empty_token_file_is_refused_naming_it(home: Path, tmp_path: Path):
    """Ray aborts on an empty token file; say so before starting anything, and do not fill it in."""
    target = tmp_path / "empty"
    target.write_text("  \n")
    with pytest.raises(RayTokenError, match=rf"RAY_AUTH_TOKEN_PATH={target}: the Ray auth token file is empty"):
        ensure_ray_token({TOKEN_PATH_ENV: str(target)})
    assert target.read_text() == "  \n"
