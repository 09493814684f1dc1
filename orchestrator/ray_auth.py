"""The Ray authentication token that `wsss services up` starts its head with.

Ray 2.60 turns token authentication on for local clusters, but only ``ray.init()`` creates a
token when none exists: ``ray start --head`` on a machine where nothing ever called
``ray.init()`` dies with ``AuthenticationError: ... no authentication token was found``.
`ensure_ray_token` finds the token Ray would use, in Ray's own order of precedence, and
creates one only where none exists (never overwriting a token that other clusters may rely on):

1. ``$RAY_AUTH_TOKEN`` (the token itself): used as it is; nothing is written.
2. ``$RAY_AUTH_TOKEN_PATH`` (a file): used if it exists; created there (mode 0600) if not.
3. ``~/.ray/auth_token``: used if it exists; else created by ``ray get-auth-token --generate``,
   the command Ray documents for clusters started with ``ray start``.

The head, ``ray job submit`` (through ``env.sh``, which exports ``RAY_AUTH_TOKEN_PATH``) and
the jobs (which inherit the head's environment) then all read the same token.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from training.errors import WsssError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


class RayTokenError(WsssError):
    """No usable Ray authentication token exists and none could be created."""


@dataclass(frozen=True)
class RayToken:
    """Where the head's token comes from.

    Attributes:
        path: the token file, or None when the token is given in ``$RAY_AUTH_TOKEN``.
        created: True when this call wrote the file (there was no token before).
    """

    path: Path | None
    created: bool = False

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this token."""
        return {TOKEN_PATH_ENV: str(self.path)} if self.path else {}

    def describe(self) -> str:
        if self.path is None:
            return f"token from ${TOKEN_ENV}"
        return f"token {self.path} ({'created now' if self.created else 'existing, kept'})"


def default_token_path() -> Path:
    """Ray's default token file (``~/.ray/auth_token``, as Ray's own code computes it)."""
    return Path.home() / ".ray" / "auth_token"


def ensure_ray_token(env: Mapping[str, str] | None = None, *, ray_bin: str = "ray") -> RayToken:
    """The token a Ray head started now would use; created only when none exists.

    Args:
        env: the environment to read (default ``os.environ``).
        ray_bin: the ``ray`` executable that generates the default token file.

    Raises:
        RayTokenError: a token file exists but is empty or unreadable (Ray itself aborts on one),
            or a new token could not be written.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return RayToken(None)
    given = env.get(TOKEN_PATH_ENV, "").strip()
    path = Path(given).expanduser() if given else default_token_path()
    if path.exists():
        _check_readable(path, given)
        return RayToken(path.resolve())
    if given:
        _write_new_token(path)
    else:
        _generate_default_token(ray_bin, path)
    return RayToken(path.resolve(), created=True)


def _check_readable(path: Path, given: str) -> None:
    where = f"${TOKEN_PATH_ENV}={given}" if given else str(path)
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise RayTokenError(f"{where}: cannot read the Ray auth token file ({err.strerror})") from None
    if not token:
        raise RayTokenError(
            f"{where}: the Ray auth token file is empty; Ray refuses to start with it. Remove the file to "
            "have one generated, or write a token into it (`ray get-auth-token --generate` makes one)"
        )


def _write_new_token(path: Path) -> None:
    """Create ``path`` holding a fresh token, readable by its owner only; fail if it appeared meanwhile."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it between our check and now: use theirs
    except OSError as err:
        raise RayTokenError(f"${TOKEN_PATH_ENV}={path}: cannot create the Ray auth token file ({err})") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator


def _generate_default_token(ray_bin: str, path: Path) -> None:
    # `ray get-auth-token --generate` writes ~/.ray/auth_token only if none exists, and prints the
    # token: keep it out of our output and logs.
    try:
        done = subprocess.run([ray_bin, "get-auth-token", "--generate"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RayTokenError(f"could not run `{ray_bin} get-auth-token --generate` to create {path}: {err}") from None
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RayTokenError(f"`ray get-auth-token --generate` did not create {path} (exit {done.returncode}: {last})")
    path.chmod(0o600)  # Ray writes it world-readable; it is a credential
