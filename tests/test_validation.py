"""The validation split: deterministic stratified hold-out, masks where they exist, val_* metrics."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.config import TrialConfig
from training.errors import ConfigError, DataError
from training.tracker import RecordingTracker
from training.trial import load_splits, run_trial
from training.validation import load_validation, split_validation, validation_items


def _items(smoke: str, clean: str) -> list[tuple[Path, int]]:
    return [(Path(f"train/smoke/{s}.png"), 1) for s in smoke] + [(Path(f"train/clean/{s}.png"), 0) for s in clean]


def test_split_holds_out_the_smallest_digests_per_class() -> None:
    # sha256 order of the stems: d < c < b < e < a, and x < z < y.
    # fraction 0.4: smoke round(5·0.4) = 2 → d, c; clean round(3·0.4) = round(1.2) = 1 → x.
    train, val = split_validation(_items("abcde", "xyz"), 0.4)
    assert [p.stem for p, _ in val] == ["c", "d", "x"]  # in the input order
    assert [p.stem for p, _ in train] == ["a", "b", "e", "y", "z"]
    assert [label for _, label in val] == [1, 1, 0]


def test_split_depends_on_names_not_order() -> None:
    items = _items("abcdefghij", "klmnopq")
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    held = {p for p, _ in split_validation(items, 0.3)[1]}
    assert {p for p, _ in split_validation(shuffled, 0.3)[1]} == held
    assert len(held) == 3 + 2  # round(10·0.3), round(7·0.3)


def test_every_class_keeps_at_least_one_image_on_each_side() -> None:
    assert [p.stem for p, _ in split_validation(_items("abc", "xy"), 0.01)[1]] == ["c", "x"]  # at least 1
    train, val = split_validation(_items("abc", "xy"), 0.99)  # at most n − 1
    assert len(val) == 2 + 1 and len(train) == 1 + 1


def test_fraction_zero_keeps_everything() -> None:
    items = _items("abc", "xy")
    assert split_validation(items, 0.0) == (items, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"data.val_fraction: expected a value in \[0, 1\)"):
        split_validation(_items("abc", "xy"), fraction)


def test_a_class_too_small_to_split() -> None:
    with pytest.raises(ConfigError, match=r"class 0 has 1 training image\(s\); expected at least 2"):
        split_validation(_items("abc", "x"), 0.5)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)
    return path


def test_validation_items_use_masks_where_they_exist(tmp_path: Path) -> None:
    smoke = _png(tmp_path / "train/smoke/s1.png", np.zeros((8, 8, 3), np.uint8))
    clean = _png(tmp_path / "train/clean/c1.jpg", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "train/masks/s1.png", np.full((8, 8), 255, np.uint8))
    _png(tmp_path / "train/context/s1.png", np.zeros((8, 8), np.uint8))
    scored, unscored = validation_items(tmp_path, [(smoke, 1), (clean, 0)])
    assert [(i.id, i.label, i.mask.name, i.context.name) for i in scored] == [("s1", 1, "s1.png", "s1.png")]
    assert unscored == [(clean, 0)]


def test_validation_items_refuse_shared_stems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"share the file stem 'a'; expected unique stems"):
        validation_items(tmp_path, [(tmp_path / "train/smoke/a.png", 1), (tmp_path / "train/clean/a.jpg", 0)])


def test_real_data_without_masks_gets_accuracy_only(tmp_path: Path, make_config) -> None:
    for i in range(4):
        _png(tmp_path / f"train/smoke/s{i}.png", np.full((16, 16, 3), 200, np.uint8))
        _png(tmp_path / f"train/clean/c{i}.png", np.full((16, 16, 3), 20, np.uint8))
    cfg = make_config(**{"data.val_fraction": 0.5}).data
    val = load_validation(cfg, tmp_path)
    assert val.scored is None and len(val) == len(val.unscored) == 4
    assert load_validation(make_config().data, tmp_path) is None


# ------------------------------------------------------------------ in a trial


@pytest.fixture(scope="module")
def val_run(tmp_path_factory: pytest.TempPathFactory, make_config: Callable[..., TrialConfig]):
    out = tmp_path_factory.mktemp("val")
    tracker = RecordingTracker()
    cfg = make_config(**{"data.val_fraction": 0.25})
    return cfg, out, run_trial(cfg, out, tracker=tracker), tracker


def test_trial_reports_validation_metrics_beside_the_test_ones(val_run, synth_root: Path) -> None:
    cfg, out, metrics, tracker = val_run
    val_keys = {k for k in metrics if k.startswith("val_")}
    assert val_keys == {
        "val_accuracy", "val_miou", "val_miou_per_image", "val_best_threshold", "val_miou_best_threshold",
        "val_oracle_miou", "val_context_activation", "val_context_fp",
    }  # fmt: skip
    assert {"miou", "accuracy", "accuracy_decoupled"} <= set(metrics)  # the test metrics are still there
    # 48 training images: 29 smoke, 19 clean → round(7.25) = 7 and round(4.75) = 5 held out
    train, _ = load_splits(cfg.data, synth_root)
    assert len(train) == 48 - 12
    index = json.loads((out / "val_cams" / "index.json").read_text())["shards"]
    assert sum(e["n"] for e in index) == 12
    # the last epoch's val accuracy is the final one: same model, same images, same logits
    assert tracker.metrics[-2][1]["val_accuracy"] == metrics["val_accuracy"]
    assert {"val_accuracy", "val_miou_1x"} <= set(tracker.metrics[0][1])
