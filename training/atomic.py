"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file a trial, a sweep or a service leaves for another process to read
(metrics, checkpoints, CAM shards, the trial listing, service state) is written
through here: into a temporary file beside the target, then renamed over it.
A crash, a kill or a full disk mid-write leaves the previous file intact. A full
disk (or quota) is reported as `StorageFull`, naming the file and the space left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.errors import StorageFull

_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file is removed when the body raises, so nothing is left behind.

    Raises:
        StorageFull: the filesystem is full or over quota; names ``path`` and the free space.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in _FULL:
            raise
        tmp.unlink(missing_ok=True)  # first: its bytes count in the free space reported
        raise StorageFull(storage_full_message(path, err)) from err
    finally:
        tmp.unlink(missing_ok=True)


def storage_full_message(path: Path, err: OSError) -> str:
    """``<path>: cannot write it: no space left on device (12.0 KiB free of 1.0 MiB on its filesystem); …``."""
    try:
        usage = shutil.disk_usage(Path(path).parent)
        space = f"{_size(usage.free)} free of {_size(usage.total)} on its filesystem"
    except OSError:
        space = "free space unknown"
    previous = f"the previous {Path(path).name} is intact" if Path(path).exists() else "nothing was written"
    return (f"{path}: cannot write it: {os.strerror(err.errno).lower()} ({space}); {previous}. "
            "Free space there (or point --storage elsewhere) and rerun the same command")  # fmt: skip


def _size(n: float) -> str:
    """1536 → ``1.5 KiB``."""
    power = 0
    while n >= 1024 and power < 4:
        n, power = n / 1024, power + 1
    return f"{int(n)} B" if power == 0 else f"{n:.1f} {'KMGT'[power - 1]}iB"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, serialised in memory first, so a full disk raises OSError (ENOSPC).

    ``torch.save`` into a file (or a file object) that hits a full disk raises an
    opaque ``RuntimeError: ... unexpected pos``; a plain write of the bytes fails
    with the real cause, which `atomic_path` reports as `StorageFull`. The cost is
    one copy of the checkpoint in memory while it is written.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def atomic_write_json(path: Path, value: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys))
