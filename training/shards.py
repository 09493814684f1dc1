"""CAM shards: the hand-off between a trial and the refinement fan-out.

A trial writes ``cams/shard-00000.npz`` … plus ``cams/index.json`` listing each
shard's SHA-256. Shards hold float16 CAMs at image resolution (sizes may differ
between images, so CAMs are stored flat with their shapes; no pickle). Every
write is atomic (temporary file + rename) and every read is checked against the
index, so a truncated or tampered shard is reported by name, never counted.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.atomic import atomic_path, atomic_write_json
from training.errors import DataError

INDEX = "index.json"


@dataclass
class CamShard:
    """CAMs of some images with what scores them: one shard on disk, all of them (`read_all`),
    or a whole split as `training.evaluate.extract_cams` makes it before they are written.

    ``cams[i]`` is H×W float32 in [0,1] at image ``ids[i]``'s own resolution.
    """

    ids: list[str]
    cams: list[np.ndarray]
    logits: np.ndarray  # N float32 smoke logits (at scale 1)
    labels: np.ndarray  # N int image labels (1 = smoke)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shards(
    cam_dir: Path,
    ids: list[str],
    cams: list[np.ndarray],
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    shard_size: int = 64,
) -> list[Path]:
    """Write CAMs in shards of ``shard_size`` images and the checksum index.

    Returns:
        The shard paths, in order.
    """
    cam_dir = Path(cam_dir)
    cam_dir.mkdir(parents=True, exist_ok=True)
    entries, paths = [], []
    for n, start in enumerate(range(0, len(ids), shard_size)):
        part = slice(start, start + shard_size)
        path = cam_dir / f"shard-{n:05d}.npz"
        _write_one(path, ids[part], cams[part], logits[part], labels[part])
        entries.append({"file": path.name, "n": len(ids[part]), "sha256": sha256_file(path)})
        paths.append(path)
    atomic_write_json(cam_dir / INDEX, {"shards": entries})
    return paths


def _write_one(path: Path, ids, cams, logits, labels) -> None:
    shapes = np.array([c.shape for c in cams], dtype=np.int64).reshape(-1, 2)
    flat = np.concatenate([c.astype(np.float16).ravel() for c in cams]) if cams else np.zeros(0, np.float16)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz"
            np.savez(
                f,
                ids=np.array(ids, dtype=str),
                shapes=shapes,
                cams=flat,
                logits=np.asarray(logits, np.float32),
                labels=np.asarray(labels, np.int64),
            )


def shard_paths(cam_dir: Path) -> list[Path]:
    """The shards listed in ``cam_dir/index.json``, in order."""
    return [Path(cam_dir) / e["file"] for e in _index(Path(cam_dir))]


def _index(cam_dir: Path) -> list[dict]:
    try:
        return json.loads((cam_dir / INDEX).read_text())["shards"]
    except FileNotFoundError:
        raise DataError(f"{cam_dir / INDEX}: no CAM index; expected a trial's cams/ folder") from None
    except (ValueError, KeyError) as err:
        raise DataError(f"{cam_dir / INDEX}: unreadable CAM index ({err})") from None


def read_shard(path: Path, *, verify: bool = True) -> CamShard:
    """Load one shard, checking its SHA-256 against the index first.

    Raises:
        DataError: naming the shard, when it is missing, truncated or altered.
    """
    path = Path(path)
    if verify:
        expected = {e["file"]: e["sha256"] for e in _index(path.parent)}.get(path.name)
        if expected is None:
            raise DataError(f"{path}: not listed in {path.parent / INDEX}")
        if not path.is_file() or sha256_file(path) != expected:
            raise DataError(f"{path}: CAM shard is missing, truncated or altered (checksum mismatch)")
    try:
        with np.load(path, allow_pickle=False) as z:
            shapes, flat = z["shapes"], z["cams"]
            ids, logits, labels = [str(i) for i in z["ids"]], z["logits"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read CAM shard ({err})") from None
    ends = np.cumsum([h * w for h, w in shapes])
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    cams = [flat[s:e].astype(np.float32).reshape(h, w) for s, e, (h, w) in zip(starts, ends, shapes, strict=True)]
    return CamShard(ids=ids, cams=cams, logits=logits, labels=labels)


def read_all(cam_dir: Path) -> CamShard:
    """All shards of a trial concatenated (for small test sets and tests)."""
    parts = [read_shard(p) for p in shard_paths(cam_dir)]
    return CamShard(
        ids=[i for p in parts for i in p.ids],
        cams=[c for p in parts for c in p.cams],
        logits=np.concatenate([p.logits for p in parts]) if parts else np.zeros(0, np.float32),
        labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64),
    )
