"""A real tiny sweep under Ray Tune, read back from MLflow (the product's main job).

Marked slow: it starts Ray and trains three tiny models (about a minute on 2 cores).
CI runs it (the README's test command runs every marker).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from orchestrator.cli import main
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, default_tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, synth_root) -> Path:
    """Run the sweep once in a fresh folder (the cwd holds mlflow.db and runs/)."""
    folder = tmp_path_factory.mktemp("sweep")
    base = tiny_config_dict(synth_root)
    space = {
        "name": "tiny",
        "description": "tiny end-to-end sweep",
        "base": base,
        "grid": {"transfer.paradigm": ["teacher_student", "co_training"]},
        "resources": {"cpu": 1},
        "tables": [{"name": "paradigms", "rows": ["arm"], "columns": ["transfer.metric", "transfer.level"]}],
        "refine": {"trials": "best:1", "pipelines": [[{"step": "crf", "iters": 1, "scale": {"grid": [4, 12]}}]]},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(folder)
        code = main(["sweep", "tiny.yaml", "--num-cpus", "2"])
    (folder / "stdout.txt").write_text(out.getvalue())
    (folder / "stderr.txt").write_text(err.getvalue())
    assert code == 0, err.getvalue()
    return folder


def _runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(folder))
    (exp,) = [e for e in client.search_experiments() if e.name == "wsss-sweeps"]
    return client, client.search_runs([exp.experiment_id])


def test_mlflow_holds_one_parent_and_one_finished_child_per_trial(sweep_dir):
    client, runs = _runs(sweep_dir)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"miou", "miou_per_image", "accuracy", "context_activation"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "loss")) == 2  # one point per epoch
        assert child.data.params["transfer.paradigm"] in {"teacher_student", "co_training"}
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "metrics.json", "gallery"} <= names
    assert {c.info.run_name for c in children} == {
        "teacher_student · cosine · global · λ=1",
        "co_training · cosine · global · λ=1",
    }
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/paradigms.md", "tables/paradigms.csv", "tables/results.md"} <= tables
    assert parent.info.status == "FINISHED"
    refined = {a.path for a in client.list_artifacts(parent.info.run_id, "refine")}
    assert "refine/refine_miou_refined.md" in refined


def test_the_console_gives_a_line_per_trial_event_and_tune_prints_no_tables(sweep_dir):
    """Not a terminal here, so the log form: a line per event led by the sweep's bar, on stderr;
    stdout keeps the results. Tune's own config and status tables appear nowhere."""
    err, out = (sweep_dir / "stderr.txt").read_text(), (sweep_dir / "stdout.txt").read_text()
    lines = err.splitlines()
    assert "[--------------------]  tiny: 0/2 trials done, 2 pending" in lines
    for trial_id in ("000-teacher_student", "001-co_training"):
        assert [line for line in lines if f" {trial_id} " in line and "  started" in line], err
        (done,) = [line for line in lines if f" {trial_id} " in line and "  done  epoch 2/2  loss " in line]
        assert " miou " in done
    assert any(line.startswith("[####################]  tiny: 2/2 trials done") for line in lines), err
    assert "refine: done in " in err
    for tune_says in ("Trial status", "started with configuration", "Configuration for experiment", "tensorboard"):
        assert tune_says not in err + out
    assert "## paradigms" in out and "\x1b" not in err + out


def test_refinement_ran_after_the_grid_on_the_best_trial(sweep_dir):
    _, runs = _runs(sweep_dir)
    refined = [r for r in runs if any(k.startswith("refine/") for k in r.data.metrics)]
    assert len(refined) == 1  # best:1
    keys = {k for k in refined[0].data.metrics if k.startswith("refine/")}
    assert {"refine/seed/miou", "refine/crf_iters_1_scale_4/miou"} <= keys or len(keys) == 6, keys
    seed = refined[0].data.metrics["refine/seed/miou"]
    # The seed pipeline re-thresholds the saved CAMs, which shards store as float16.
    assert seed == pytest.approx(refined[0].data.metrics["miou"], abs=1e-3)


def test_rerunning_a_finished_sweep_adds_nothing_and_retrains_nothing(sweep_dir, monkeypatch, capsys):
    metrics = sorted((sweep_dir / "runs" / "tiny" / "trials").glob("*/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in metrics]
    _, before = _runs(sweep_dir)
    monkeypatch.chdir(sweep_dir)
    assert main(["sweep", "tiny.yaml", "--num-cpus", "2"]) == 0
    assert "2/2 trials finished" in capsys.readouterr().out
    _, after = _runs(sweep_dir)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    assert all(r.info.status == "FINISHED" for r in after)
    assert [p.stat().st_mtime_ns for p in metrics] == stamps


def test_a_trial_reruns_locally_with_the_same_metrics(sweep_dir, monkeypatch):
    monkeypatch.chdir(sweep_dir)
    trial_id = "000-teacher_student"
    out = sweep_dir / "rerun"
    assert main(["trial", "--from-sweep", "tiny", "--trial", trial_id, "--out", str(out)]) == 0
    swept = json.loads((sweep_dir / "runs" / "tiny" / "trials" / trial_id / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == swept


def test_tables_command_prints_the_pivot_from_mlflow(sweep_dir, monkeypatch, capsys):
    monkeypatch.chdir(sweep_dir)
    assert main(["tables", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| teacher_student |" in out and "| co_training |" in out


def test_a_settled_sweep_whose_refinement_is_missing_refines_without_retraining(sweep_dir, monkeypatch, capsys):
    """The settled path still starts Ray when it must (`RaySession` starts it on first need)."""
    root = sweep_dir / "runs" / "tiny"
    marker = root / "refine.json"
    tables = json.loads(marker.read_text())["tables"]
    metrics = sorted(root.glob("trials/*/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in metrics]
    marker.unlink()  # as if the driver had stopped during the refinement
    monkeypatch.chdir(sweep_dir)
    assert main(["sweep", "tiny.yaml", "--num-cpus", "2"]) == 0
    assert "2/2 trials finished" in capsys.readouterr().out
    assert json.loads(marker.read_text())["tables"] == tables  # the same refinement, redone from its units
    assert [p.stat().st_mtime_ns for p in metrics] == stamps
