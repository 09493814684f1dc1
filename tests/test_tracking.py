"""MLflow sweep tracking against a temporary sqlite store."""

from __future__ import annotations

import io
import pickle
import socket
import time
from pathlib import Path

import pytest

from orchestrator.offline import JournalingTracker
from orchestrator.tracking import (
    MAX_PARAM_VALUE,
    MlflowTracker,
    SweepTracking,
    TrackingUnavailable,
    check_reachable,
    default_tracking_uri,
    flatten,
)
from training.errors import ConfigError
from training.tracker import ConsoleTracker, RecordingTracker, Tracker

SPACE = {"transfer": {"lam": {"grid_search": [0.5, 1.0]}, "metric": "cosine"}, "seed": 42}


@pytest.fixture
def sweep(uri: str) -> SweepTracking:
    return SweepTracking.open(uri, "wsss", "grid1", space=SPACE, description="a test sweep")


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(Path(".")) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.mark.parametrize(
    ("nested", "flat"),
    [
        ({}, {}),
        ({"a": 1}, {"a": "1"}),
        ({"transfer": {"lam": 1.0, "metric": "cosine"}}, {"transfer.lam": "1.0", "transfer.metric": "cosine"}),
        ({"a": {"b": {"c": None}}, "d": [1, 2]}, {"a.b.c": "None", "d": "[1, 2]"}),
    ],
)
def test_flatten(nested, flat):
    assert flatten(nested) == flat


def test_flatten_prefix():
    assert flatten({"x": {"y": True}}, prefix="cfg") == {"cfg.x.y": "True"}


def test_open_twice_returns_same_parent(uri, sweep):
    again = SweepTracking.open(uri, "wsss", "grid1", space=SPACE, description="reopened")
    assert again.parent_run_id == sweep.parent_run_id
    assert again.experiment_id == sweep.experiment_id
    other = SweepTracking.open(uri, "wsss", "grid2", space=SPACE, description="")
    assert other.parent_run_id != sweep.parent_run_id


def test_parent_run_is_described(sweep, tmp_path):
    run = sweep.client.get_run(sweep.parent_run_id)
    assert run.info.run_name == "sweep:grid1"
    assert run.data.tags["wsss.sweep"] == "grid1"
    assert run.data.tags["wsss.role"] == "parent"
    assert run.data.tags["mlflow.note.content"] == "a test sweep"
    assert run.data.params == {"sweep.name": "grid1", "sweep.space_sections": "transfer,seed"}
    assert [f.path for f in sweep.client.list_artifacts(sweep.parent_run_id)] == ["search_space.yaml"]
    # artifacts land next to the database, not in the process's cwd
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())


def test_child_run_is_idempotent(sweep):
    params = {"transfer": {"lam": 1.0, "metric": "cosine"}, "seed": 1}
    first = sweep.child_run("t_0001", run_name="trial 1", params=params)
    sweep.finish(first, "FAILED")
    second = sweep.child_run("t_0001", run_name="trial 1", params={**params, "seed": 2})
    assert first == second
    assert [r.info.run_id for r in sweep.child_runs()] == [first]
    run = sweep.client.get_run(first)
    assert run.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
    assert run.data.params == {"transfer.lam": "1.0", "transfer.metric": "cosine", "seed": "1"}
    assert run.info.status == "RUNNING"  # retried trial runs again


def test_find_child(sweep):
    run_id = sweep.child_run("t_2", run_name="two", params={})
    assert sweep.find_child("t_2").info.run_id == run_id
    assert sweep.find_child("t_3") is None


def test_long_param_values_are_clipped(sweep):
    run_id = sweep.child_run("t_long", run_name="long", params={"note": "x" * 5000})
    value = sweep.client.get_run(run_id).data.params["note"]
    assert len(value) == MAX_PARAM_VALUE and value.endswith("...")


def test_quotes_in_names_are_rejected(sweep):
    with pytest.raises(ConfigError, match="trial id"):
        sweep.child_run("it's", run_name="x", params={})


def test_finish_rejects_unknown_status(sweep):
    with pytest.raises(ConfigError, match="DONE"):
        sweep.finish(sweep.parent_run_id, "DONE")


def test_close_dangling(sweep):
    done = sweep.child_run("a", run_name="a", params={})
    open_ = sweep.child_run("b", run_name="b", params={})
    sweep.finish(done)
    closed = sweep.close_dangling()
    assert sorted(closed) == sorted([open_, sweep.parent_run_id])
    status = {r.info.run_id: r.info.status for r in sweep.child_runs()}
    assert status == {done: "FINISHED", open_: "KILLED"}
    assert sweep.client.get_run(sweep.parent_run_id).info.status == "KILLED"
    assert sweep.close_dangling() == []
    reopened = SweepTracking.open(sweep.uri, "wsss", "grid1", space=SPACE, description="resumed")
    assert reopened.client.get_run(reopened.parent_run_id).info.status == "RUNNING"


def test_tracker_batches_metrics(sweep, monkeypatch):
    run_id = sweep.child_run("m", run_name="m", params={})
    tracker = sweep.tracker(run_id)
    calls = []
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "miou": 0.1 * step}, step=step)
    assert len(calls) == 3
    history = tracker.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]


def test_tracker_params_tags_artifacts(sweep, tmp_path):
    run_id = sweep.child_run("p", run_name="p", params={"seed": 1})
    tracker = MlflowTracker(sweep.uri, run_id)
    tracker.log_params({"model": {"backbone": "resnet18"}, "seed": 99})
    tracker.set_tags({"stage": "student"})
    (tmp_path / "cfg.yaml").write_text("a: 1\n")
    tracker.log_artifact(tmp_path / "cfg.yaml", "config")
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"seed": "1", "model.backbone": "resnet18"}
    assert run.data.tags["stage"] == "student"
    assert [f.path for f in tracker.client.list_artifacts(run_id, "config")] == ["config/cfg.yaml"]


def test_tracker_and_sweep_pickle(sweep):
    run_id = sweep.child_run("k", run_name="k", params={})
    tracker = sweep.tracker(run_id)
    assert tracker.client is not None  # a live client must not travel with the pickle
    clone = pickle.loads(pickle.dumps(tracker))
    clone.log_metrics({"miou": 0.5}, step=1)
    assert clone.client.get_run(run_id).data.metrics == {"miou": 0.5}
    sweep_clone = pickle.loads(pickle.dumps(sweep))
    assert sweep_clone.find_child("k").info.run_id == run_id


def test_parent_run_goes_through_its_tracker(sweep, tmp_path):
    """Tables, tags and the status of the parent run go through the same `Tracker` as a trial's."""
    parent = sweep.parent
    assert parent.run_id == sweep.parent_run_id and parent.client is sweep.client  # one client, not a new one
    (tmp_path / "tables" / "sub").mkdir(parents=True)
    (tmp_path / "tables" / "metric.md").write_text("| a |\n")
    (tmp_path / "tables" / "sub" / "x.csv").write_text("a\n1\n")
    parent.log_artifact(tmp_path / "tables", "tables")
    assert parent.list_artifacts("tables") == ["tables/metric.md", "tables/sub"]
    assert parent.download_artifact("tables/metric.md", tmp_path / "back").read_text() == "| a |\n"
    parent.set_tags({"wsss.failed_trials": "002-nan"})
    parent.set_status("FAILED")
    run = sweep.client.get_run(sweep.parent_run_id)
    assert run.info.status == "FAILED" and run.data.tags["wsss.failed_trials"] == "002-nan"


@pytest.mark.parametrize("kind", ["recording", "console", "mlflow", "journaling"])
def test_every_tracker_speaks_the_whole_protocol(kind, tmp_path):
    trackers = {
        "recording": lambda: RecordingTracker(),
        "console": lambda: ConsoleTracker(tmp_path, stream=io.StringIO()),
        "mlflow": lambda: MlflowTracker(f"sqlite:///{tmp_path}/unused.db", "run"),
        "journaling": lambda: JournalingTracker(None, tmp_path / "unsynced.jsonl", offline="test"),
    }
    assert isinstance(trackers[kind](), Tracker)


def test_recording_tracker_lists_what_a_store_would(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "metric.png").write_bytes(b"png")
    (tmp_path / "metrics.json").write_text("{}")
    tracker = RecordingTracker()
    tracker.log_artifact(tmp_path / "plots", "plots")
    tracker.log_artifact(tmp_path / "plots", "plots")  # logged again: listed once
    tracker.log_artifact(tmp_path / "metrics.json")
    assert tracker.list_artifacts() == ["metrics.json", "plots"]
    assert tracker.list_artifacts("plots") == ["plots/metric.png"]
    tracker.set_status("FINISHED")
    with pytest.raises(ConfigError, match=r"run status 'DONE'; expected one of RUNNING, FINISHED, FAILED, KILLED"):
        tracker.set_status("DONE")
    assert tracker.statuses == ["FINISHED"]


def test_find_unknown_sweep_lists_known(uri, sweep):
    with pytest.raises(ConfigError, match=r"'nope'.*grid1"):
        SweepTracking.find(uri, "nope")
    assert SweepTracking.find(uri, "grid1").parent_run_id == sweep.parent_run_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_reachable_http_nothing_listening(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")) as info:
        check_reachable(uri, timeout=1.0)
    assert time.monotonic() - start < 3
    assert "mlflow server" in str(info.value)


def test_check_reachable_sqlite(tmp_path):
    check_reachable(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TrackingUnavailable, match="missing"):
        check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")
