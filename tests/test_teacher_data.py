"""The teacher's own training data (`transfer.teacher_data`) and the baseline-CNN trial that
reuses its cached teacher run instead of training the same network again.

The known-answer control of issue 13 trains the teacher on data where the chimney carries no
label information and the student on the benchmark's coupled data: one config, two datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from training.config import TrialConfig
from training.config.trial import teacher_data_config
from training.errors import ConfigError
from training.feature_cache import cache_path
from training.tracker import RecordingTracker
from training.trial import (
    cached_teacher_run,
    ensure_teacher,
    is_own_teacher,
    load_splits,
    prepare_data,
    run_trial,
    teacher_config,
    teacher_key,
)

DECOUPLED = {"synth.chimney_with_smoke": 0.5, "synth.chimney_in_clean": 0.5}


def _ts(**overrides) -> TrialConfig:
    return TrialConfig().replace(**{"transfer.paradigm": "teacher_student", **overrides})


# ---------------------------------------------------------------- the config field


def test_teacher_data_applies_to_the_teacher_only() -> None:
    cfg = _ts(**{"transfer.teacher_data": DECOUPLED})
    teacher = teacher_config(cfg)
    assert (teacher.data.synth.chimney_with_smoke, teacher.data.synth.chimney_in_clean) == (0.5, 0.5)
    assert (cfg.data.synth.chimney_with_smoke, cfg.data.synth.chimney_in_clean) == (1.0, 0.1)  # the student's
    assert teacher.data.synth.n_train == cfg.data.synth.n_train  # everything not named is kept
    assert teacher.transfer.teacher_data == {}  # the teacher run is a plain baseline


def test_nested_mapping_merges_key_by_key() -> None:
    nested = teacher_data_config(TrialConfig().data, {"synth": {"chimney_with_smoke": 0.5}, "image_size": 64})
    dotted = teacher_data_config(TrialConfig().data, {"synth.chimney_with_smoke": 0.5, "image_size": 64})
    assert nested == dotted
    assert nested.synth.size == TrialConfig().data.synth.size  # not replaced by the one-key mapping


def test_empty_teacher_data_keeps_the_teacher_key() -> None:
    # the field is new: every teacher cached before it must keep its key
    assert teacher_config(_ts()).data == _ts().data
    assert teacher_key(_ts(**{"transfer.teacher_data": {}})) == teacher_key(_ts())


def test_teacher_data_is_part_of_the_teacher_key() -> None:
    assert teacher_key(_ts(**{"transfer.teacher_data": DECOUPLED})) != teacher_key(_ts())
    same_value = _ts(**{"transfer.teacher_data": {"synth.chimney_with_smoke": 1.0}})  # the student's own value
    assert teacher_key(same_value) == teacher_key(_ts())


@pytest.mark.parametrize(
    ("teacher_data", "match"),
    [
        ({"synth.chimney_with_smok": 0.5},
         r"transfer\.teacher_data\.synth\.chimney_with_smok: unknown key .*did you mean \"chimney_with_smoke\""),
        ({"synth.chimney_with_smoke": 1.5},
         r"transfer\.teacher_data\.synth\.chimney_with_smoke: expected a number in \[0"),
        ({"val_fraction": 1.0}, r"transfer\.teacher_data\.val_fraction: expected a value in \[0, 1\)"),
        ({"data.synth.seed": 1}, r"transfer\.teacher_data\.data: unknown key"),
    ],
)  # fmt: skip
def test_bad_teacher_data_names_the_key(teacher_data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _ts(**{"transfer.teacher_data": teacher_data})


@pytest.mark.parametrize("paradigm", ["co_training", "baseline"])
def test_teacher_data_needs_a_teacher_trained_first(paradigm: str) -> None:
    with pytest.raises(ConfigError, match=rf"transfer\.teacher_data: .*teacher_student.*'{paradigm}'; remove the key"):
        TrialConfig().replace(**{"transfer.paradigm": paradigm, "transfer.teacher_data": DECOUPLED})


def test_one_pinned_folder_cannot_hold_two_datasets() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.teacher_data: changes data\.synth, but data\.root pins"):
        _ts(**{"data.root": "somewhere", "transfer.teacher_data": DECOUPLED})
    own = _ts(**{"data.root": "somewhere", "transfer.teacher_data": {**DECOUPLED, "root": "elsewhere"}})
    assert teacher_config(own).data.root == "elsewhere"


# ---------------------------------------------------------------- a trial with its own teacher data


def test_teacher_trains_on_its_data_and_the_student_on_its_own(make_config, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    student_only = make_config(**{"data.root": "", "transfer.paradigm": "teacher_student", "cam.gallery": 0})
    cfg = student_only.replace(**{"transfer.teacher_data": DECOUPLED})
    metrics = run_trial(cfg, tmp_path / "out", tracker=RecordingTracker(), cache=cache)

    teacher_run = cache / "teachers" / f"teacher-{teacher_key(cfg)}"
    trained_on = yaml.safe_load((teacher_run / "config.yaml").read_text())["data"]["synth"]
    assert (trained_on["chimney_with_smoke"], trained_on["chimney_in_clean"]) == (0.5, 0.5)
    # two generated datasets: the teacher's and the student's
    manifests = [json.loads(p.read_text())["config"] for p in (cache / "synth").glob("*/manifest.json")]
    assert sorted(m["chimney_with_smoke"] for m in manifests) == [0.5, 1.0]
    # the feature cache ran the teacher over the student's own training images
    student_train, _ = load_splits(cfg.data, prepare_data(cfg.data, cache))
    features = cache_path(cache, str(teacher_run.with_suffix(".pt")), student_train, "float16")
    assert features.is_file()
    # and the student's test split is the one its metrics are computed on: the same as without teacher_data
    plain = run_trial(student_only, tmp_path / "plain", tracker=RecordingTracker(), cache=cache)
    ids = [json.loads((tmp_path / run / "cams" / "index.json").read_text()) for run in ("out", "plain")]
    assert [e["n"] for e in ids[0]["shards"]] == [e["n"] for e in ids[1]["shards"]]
    assert metrics.keys() == plain.keys()
    assert metrics != plain  # another teacher, another student


# ---------------------------------------------------------------- the baseline CNN that is its own teacher


def _cnn_of(cfg: TrialConfig) -> TrialConfig:
    """The baseline-CNN trial of ``cfg`` written the way a sweep's include writes it."""
    return cfg.replace(**{
        "transfer.paradigm": "baseline", "transfer.baseline_network": "teacher",
        "train.epochs": cfg.train.teacher_epochs, "train.lr": cfg.train.teacher_lr,
    })  # fmt: skip


def test_which_baselines_are_their_own_teacher() -> None:
    ts = _ts()
    assert is_own_teacher(_cnn_of(ts))
    assert is_own_teacher(_cnn_of(ts).replace(**{"train.threads": 2, "name": "other"}))  # neither changes weights
    assert not is_own_teacher(ts)
    assert not is_own_teacher(_cnn_of(ts).replace(**{"train.epochs": ts.train.teacher_epochs + 1}))
    assert not is_own_teacher(_cnn_of(ts).replace(**{"transfer.baseline_network": "student"}))


def test_baseline_cnn_reuses_the_cached_teacher_run_with_the_same_metrics(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    ts = make_config(**{"transfer.paradigm": "teacher_student"})
    cnn = _cnn_of(ts)
    assert cached_teacher_run(cnn, cache) is None  # nothing cached yet
    fresh = run_trial(cnn, tmp_path / "fresh", tracker=RecordingTracker(), cache=cache)  # trains, caches nothing
    assert not (cache / "teachers").exists()

    ensure_teacher(ts, cache)
    teacher_run = cached_teacher_run(cnn, cache)
    assert teacher_run == cache / "teachers" / f"teacher-{teacher_key(ts)}"
    assert json.loads((teacher_run / "metrics.json").read_text()) == fresh  # the premise of the reuse

    def no_training(*args, **kwargs):
        raise AssertionError("the baseline CNN was trained again")

    monkeypatch.setattr("training.trial.train_epoch", no_training)
    tracker = RecordingTracker()
    reused = run_trial(cnn, tmp_path / "reused", tracker=tracker, cache=cache)
    assert reused == fresh
    out = tmp_path / "reused"
    assert json.loads((out / "metrics.json").read_text()) == fresh
    assert (out / "cams" / "index.json").read_text() == (tmp_path / "fresh" / "cams" / "index.json").read_text()
    assert "name: tiny" in (out / "config.yaml").read_text()  # its own config, not the teacher's
    epochs = [step for step, m in tracker.metrics if "loss" in m]
    assert epochs == list(range(1, cnn.train.epochs + 1))  # the per-epoch curve is replayed
    assert tracker.tags["wsss.reused_run"] == teacher_run.name
    assert tracker.params["name"] == "tiny"
