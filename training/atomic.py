"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file a trial, a sweep or a service leaves for another process to read
(metrics, checkpoints, CAM shards, the trial listing, service state) is written
through here: into a temporary file beside the target, then renamed over it.
A crash, a kill or a full disk mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file is removed when the body raises, so nothing is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, value: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys))
