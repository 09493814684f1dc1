"""A real tiny search under Ray Tune with ASHA, interrupted twice (SIGINT, SIGTERM) and resumed.

Marked slow: three driver starts (Ray each time) and three tiny trainings.
One known point (λ = 1) runs first, then Optuna suggests two trials, one at a
time (``max_concurrent: 1``), so the whole search is reproducible from its seed:
each recorded suggestion must be what `orchestrator.search.suggest` gives from
the trials before it, which holds only if no interruption lost an observation or
repeated a suggestion.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from conftest import tiny_config_dict
from test_faults import _finish, _runs, _wait_for, _write_space, _wsss

from orchestrator.search import suggest
from orchestrator.search_tune import STOPPED_TAG
from orchestrator.space import load_space
from orchestrator.sweep_dir import SweepDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(tmp_path_factory, synth_root) -> dict:
    folder = tmp_path_factory.mktemp("search")
    base = tiny_config_dict(synth_root)
    base["transfer"]["paradigm"] = "co_training"
    base["data"]["val_fraction"] = 0.25
    space = {
        "name": "tpe",
        "base": base,
        "include": [{"transfer.lam": 1.0}],
        "sample": {"transfer.lam": {"loguniform": [0.1, 10.0]}, "transfer.metric": {"choice": ["cosine", "l1"]}},
        "search": {"metric": "val_miou", "mode": "max", "num_trials": 3, "seed": 3, "startup_trials": 2},
        "scheduler": {"type": "asha", "metric": "val_miou_1x", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1},
        "max_concurrent": 1,
        "tables": [{"name": "metrics", "rows": ["transfer.metric"], "columns": ["arm"], "value": "val_miou"}],
        "refine": {"trials": "best:1", "pipelines": [[{"step": "crf", "iters": 1}]]},
    }
    _write_space(folder, space)
    trials = folder / "runs" / "tpe" / "trials"

    def settled() -> int:
        return len([*trials.glob("*/metrics.json"), *trials.glob("*/stopped.json")])

    seen: dict = {"folder": folder}
    for sig, after in ((signal.SIGINT, 1), (signal.SIGTERM, 2)):
        proc = _wsss(folder, "sweep", "tpe.yaml", "--num-cpus", "2")
        _wait_for(lambda after=after: settled() >= after, proc)
        proc.send_signal(sig)
        seen[sig] = _finish(proc, timeout=600)
    seen["code"], seen["out"] = _finish(_wsss(folder, "sweep", "tpe.yaml", "--num-cpus", "2"), timeout=600)
    return seen


def test_interrupted_search_says_how_to_resume(searched):
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, out = searched[sig]
        assert code != 0 and "UNFINISHED: resume with\n  wsss sweep tpe.yaml --num-cpus 2" in out, out
    assert searched["code"] == 0, searched["out"]


def test_suggestions_are_the_uninterrupted_search(searched, tmp_path):
    folder = searched["folder"]
    sweep = SweepDir.of(folder / "runs", "tpe")
    listing = sweep.load_trials()
    assert [r["origin"] for r in listing.values()] == ["known", "suggested", "suggested"]
    ids = list(listing)
    assert ids[0] == "000-lam1" and [i[:4] for i in ids] == ["000-", "001-", "002-"]
    space = load_space(folder / "tpe.yaml")
    for k in range(1, 3):  # replay: a folder holding only the trials before k suggests trial k
        replay = SweepDir.of(tmp_path / "replay", f"k{k}")
        replay.root.mkdir(parents=True)
        shutil.copy(sweep.space_file, replay.space_file)
        replay.trials_file.write_text(json.dumps(dict(list(listing.items())[:k])))
        for trial_id in ids[:k]:
            for name in ("metrics.json", "stopped.json", "diverged.json"):
                if (sweep.trial(trial_id).path / name).is_file():
                    replay.trial(trial_id).create()
                    shutil.copy(sweep.trial(trial_id).path / name, replay.trial(trial_id).path / name)
        assert suggest(space, replay).overrides == listing[ids[k]]["overrides"], k
    status = sweep.status()
    assert status.complete and len(status.finished) + len(status.stopped) == 3


def test_one_closed_child_run_per_trial_and_the_search_on_the_parent(searched):
    folder = searched["folder"]
    sweep = SweepDir.of(folder / "runs", "tpe")
    client, parent, children = _runs(folder, "tpe")
    assert sorted(children) == sorted(sweep.load_trials()) and all(len(r) == 1 for r in children.values())
    for trial_id, (run,) in children.items():
        stopped = sweep.trial(trial_id).stopped.is_file()
        assert run.info.status == ("KILLED" if stopped else "FINISHED"), trial_id
        assert (STOPPED_TAG in run.data.tags) == stopped
        assert run.info.run_name == sweep.load_trials()[trial_id]["run_name"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["wsss.search.best_trial"].split(" ")[0] in children
    assert client.get_metric_history(parent.info.run_id, "search_best_val_miou")
    artifacts = {a.path for sub in ("tables", "plots") for a in client.list_artifacts(parent.info.run_id, sub)}
    assert {"plots/search_history.png", "tables/search_history.md", "tables/parameter_importances.md",
            "tables/metrics.md"} <= artifacts  # fmt: skip
    note = parent.data.tags["mlflow.note.content"]
    assert "### search_history" in note and "search_history.png" in note and "### parameter_importances" in note
    assert "**Best by val_miou:**" in note
    refined = {a.path for a in client.list_artifacts(parent.info.run_id, "refine")}
    assert any(p.startswith("refine/refine_") for p in refined), refined  # best:1 over the search's trials
