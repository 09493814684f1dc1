"""CAM shards: round trip, checksums, no temporary files left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.errors import DataError
from training.shards import INDEX, read_all, read_shard, shard_paths, write_shards

SIZES = [(4, 6), (5, 5), (3, 8), (7, 2), (1, 1)]


def _data(seed: int = 0) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"img-{i:03d}" for i in range(len(SIZES))]
    cams = [rng.random(hw, dtype=np.float32) for hw in SIZES]
    cams[4][:] = 1.0  # the top of the range survives float16 exactly
    logits = rng.normal(size=len(SIZES)).astype(np.float32)
    labels = np.array([1, 0, 1, 1, 0])
    return ids, cams, logits, labels


@pytest.mark.parametrize(("shard_size", "n_shards"), [(2, 3), (5, 1), (64, 1), (1, 5)])
def test_round_trip(tmp_path: Path, shard_size: int, n_shards: int) -> None:
    ids, cams, logits, labels = _data()
    originals = [c.copy() for c in cams]
    paths = write_shards(tmp_path / "cams", ids, cams, logits, labels, shard_size=shard_size)
    assert [p.name for p in paths] == [f"shard-{i:05d}.npz" for i in range(n_shards)]
    assert shard_paths(tmp_path / "cams") == paths
    back = read_all(tmp_path / "cams")
    assert back.ids == ids
    assert [c.shape for c in back.cams] == SIZES
    for got, want in zip(back.cams, cams, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=5e-4)  # float16 storage: 2^-11 relative
    np.testing.assert_array_equal(back.cams[4], np.ones((1, 1)))
    np.testing.assert_array_equal(back.logits, logits)
    np.testing.assert_array_equal(back.labels, labels)
    assert all(np.array_equal(a, b) for a, b in zip(cams, originals, strict=True))  # inputs not mutated


def test_index_lists_counts_and_checksums(tmp_path: Path) -> None:
    ids, cams, logits, labels = _data()
    write_shards(tmp_path, ids, cams, logits, labels, shard_size=2)
    index = json.loads((tmp_path / INDEX).read_text())["shards"]
    assert [e["n"] for e in index] == [2, 2, 1]
    assert all(len(e["sha256"]) == 64 for e in index)


def test_empty_set(tmp_path: Path) -> None:
    write_shards(tmp_path, [], [], np.zeros(0), np.zeros(0), shard_size=4)
    back = read_all(tmp_path)
    assert back.ids == [] and back.cams == [] and len(back.logits) == 0


def test_truncated_shard_names_it(tmp_path: Path) -> None:
    ids, cams, logits, labels = _data()
    paths = write_shards(tmp_path, ids, cams, logits, labels, shard_size=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    read_shard(paths[0])  # the others are still fine
    with pytest.raises(DataError, match=r"shard-00001\.npz: CAM shard is missing, truncated or altered"):
        read_shard(paths[1])
    with pytest.raises(DataError, match=r"shard-00001\.npz"):
        read_all(tmp_path)
    # without the checksum the broken zip is still reported by name, not as a numpy error
    with pytest.raises(DataError, match=r"shard-00001\.npz: cannot read CAM shard"):
        read_shard(paths[1], verify=False)


def test_altered_and_deleted_shards(tmp_path: Path) -> None:
    ids, cams, logits, labels = _data()
    paths = write_shards(tmp_path, ids, cams, logits, labels, shard_size=2)
    other = write_shards(tmp_path / "other", ids, _data(seed=1)[1], logits, labels, shard_size=2)
    paths[0].write_bytes(other[0].read_bytes())  # a valid shard, but not the one indexed
    with pytest.raises(DataError, match=r"shard-00000\.npz: CAM shard is missing"):
        read_shard(paths[0])
    paths[2].unlink()
    with pytest.raises(DataError, match=r"shard-00002\.npz: CAM shard is missing"):
        read_shard(paths[2])
    stray = tmp_path / "shard-00009.npz"
    stray.write_bytes(other[1].read_bytes())
    with pytest.raises(DataError, match=r"shard-00009\.npz: not listed in"):
        read_shard(stray)


def test_missing_or_broken_index(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{INDEX}: no CAM index"):
        shard_paths(tmp_path)
    with pytest.raises(DataError, match=rf"{INDEX}: no CAM index"):
        read_all(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(DataError, match="unreadable CAM index"):
        shard_paths(tmp_path)
    (tmp_path / INDEX).write_text('{"files": []}')
    with pytest.raises(DataError, match="unreadable CAM index"):
        shard_paths(tmp_path)


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    ids, cams, logits, labels = _data()
    write_shards(tmp_path, ids, cams, logits, labels, shard_size=2)
    write_shards(tmp_path, ids, cams, logits, labels, shard_size=2)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX, *(f"shard-{i:05d}.npz" for i in range(3))]
