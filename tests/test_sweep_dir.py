"""The sweep folder's layout and what is read from it (`orchestrator.sweep_dir`), without Ray or MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from orchestrator.space import TrialSpec, expand, load_space
from orchestrator.sweep_dir import SweepDir, SweepStatus
from training.config import load_trial_config
from training.errors import ConfigError


def _space(tmp_path: Path, lams: list[float]):
    path = tmp_path / "lam.yaml"
    body = {"name": "lam", "base": tiny_config_dict(), "grid": {"transfer.paradigm": ["co_training"],
                                                                "transfer.lam": lams}}  # fmt: skip
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return load_space(path)


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[SweepDir, list]:
    """A sweep of three trials (λ 0.5, 1, 2) recorded in ``<tmp>/runs/lam``."""
    space = _space(tmp_path, [0.5, 1.0, 2.0])
    trials = expand(space)
    sweep = SweepDir.of(tmp_path / "runs", "lam")
    sweep.record(space, trials)
    return sweep, trials


def test_record_writes_the_listing_and_the_resolved_space(recorded, tmp_path):
    sweep, trials = recorded
    assert sweep.root == (tmp_path / "runs" / "lam").resolve() and sweep.exists()
    listing = sweep.load_trials()
    assert list(listing) == [t.id for t in trials]
    assert listing[trials[1].id]["overrides"] == {"transfer.paradigm": "co_training", "transfer.lam": 1.0}
    stored = yaml.safe_load(sweep.space_file.read_text())
    assert stored["base"]["name"] == "tiny" and "grid" in stored  # the base inline: the folder rebuilds the space


def test_record_again_is_a_no_op_but_another_space_is_refused(recorded, tmp_path):
    sweep, trials = recorded
    before = sweep.trials_file.read_text()
    sweep.record(_space(tmp_path, [0.5, 1.0, 2.0]), trials)
    assert sweep.trials_file.read_text() == before
    other = _space(tmp_path, [3.0])
    with pytest.raises(ConfigError, match=r"sweep folder .*lam holds another search space; choose another --name"):
        sweep.record(other, expand(other))


def test_status_is_read_from_the_trial_folders(recorded):
    sweep, trials = recorded
    done, nan, todo = (sweep.trial(t.id) for t in trials)
    assert sweep.status() == SweepStatus([], [], 3) and not sweep.status().settled
    done.create().write_metrics({"miou": 0.25})
    nan.create().mark_diverged("loss is not finite at epoch 1, step 2")
    status = sweep.status()
    assert status == SweepStatus([done.id], [nan.id], 3)
    assert not status.settled and not status.complete
    assert sweep.failure_reason(nan.id) == "loss is not finite at epoch 1, step 2"
    assert sweep.failure_reason(todo.id) == "unknown"
    todo.create().write_metrics({"miou": 0.5})
    assert sweep.status().settled and not sweep.status().complete  # 2 finished + 1 diverged of 3
    sweep.mark_done(sweep.status())
    assert json.loads(sweep.done_file.read_text()) == {"finished": [done.id, todo.id], "total": 3}


def test_result_rows_join_config_labels_and_metrics(recorded):
    sweep, trials = recorded
    sweep.trial(trials[2].id).create().write_metrics({"miou": 0.5, "accuracy": 0.75})
    (row,) = sweep.result_rows()  # only the finished trial has a row
    assert row["trial_id"] == trials[2].id and row["arm"] == "co_training"
    assert row["transfer.lam"] == 2.0 and row["transfer.metric"] == "cosine"  # numbers back as numbers
    assert row["miou"] == 0.5 and row["accuracy"] == 0.75
    assert row["run_name"] == "co_training · cosine · global · λ=2"


def test_pinned_teachers_and_rewritten_configs(recorded, tmp_path):
    sweep, trials = recorded
    cached = tmp_path / "cache" / "teacher-abc.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"weights")
    pinned = sweep.pin_teacher(cached)
    assert pinned == sweep.teachers / "teacher-abc.pt" and pinned.read_bytes() == b"weights"
    cached.write_bytes(b"other")
    assert sweep.pin_teacher(cached).read_bytes() == b"weights"  # copied once, then kept
    moved = [TrialSpec(t.id, t.overrides, t.config.replace(**{"transfer.teacher_checkpoint": str(pinned)}))
             for t in trials]  # fmt: skip
    sweep.rewrite_configs(moved)
    assert {r["config"]["transfer"]["teacher_checkpoint"] for r in sweep.load_trials().values()} == {str(pinned)}


def test_rerun_config_reads_back_as_the_trial_config(recorded):
    sweep, trials = recorded
    path = sweep.write_rerun_config(trials[0].id)
    assert path == sweep.root / "reruns" / f"{trials[0].id}.yaml"
    assert load_trial_config(path) == trials[0].config
    with pytest.raises(ConfigError, match=rf"--trial '000-co_traininx-lam0.5': not in sweep lam.*{trials[0].id}"):
        sweep.write_rerun_config("000-co_traininx-lam0.5")


def test_not_a_sweep_folder(tmp_path):
    sweep = SweepDir.of(tmp_path, "never-ran")
    assert not sweep.exists()
    with pytest.raises(ConfigError, match=r"never-ran: not a sweep folder \(no trials\.json\)"):
        sweep.status()
