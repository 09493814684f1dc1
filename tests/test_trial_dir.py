"""The trial folder's layout (`training.trial_dir`) and the atomic writes every folder uses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from training.atomic import atomic_path, atomic_write_json, atomic_write_text
from training.tracker import ConsoleTracker
from training.trial import run_trial
from training.trial_dir import TrialDir


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_json_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "trials.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    atomic_write_json(target, {"b": 2, "a": 1}, indent=None, sort_keys=True)
    assert target.read_text() == '{"a": 1, "b": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["trials.json"]


def test_a_trial_writes_exactly_the_files_its_folder_names(tmp_path: Path, make_config) -> None:
    """Every file `run_trial` leaves is one `TrialDir` names, so the layout has one owner."""
    trial = TrialDir(tmp_path / "000-tiny")
    metrics = run_trial(make_config(), trial.path, tracker=ConsoleTracker(trial.path, stream=io.StringIO()))
    named = {trial.config, trial.metrics, trial.checkpoint, trial.cams, trial.gallery, trial.events}
    assert set(trial.path.iterdir()) == named
    assert trial.state.is_file() and trial.finished() and trial.read_metrics() == metrics
    assert trial.id == "000-tiny" and trial.diverged_reason() is None


def test_diverged_marker_round_trip(tmp_path: Path) -> None:
    trial = TrialDir(tmp_path / "001-nan").create()
    trial.mark_diverged("loss is not finite at epoch 1, step 2")
    assert trial.diverged_reason() == "loss is not finite at epoch 1, step 2"
    assert not trial.finished()
    assert trial.diverged.read_text() == '{"reason": "loss is not finite at epoch 1, step 2"}'
