"""The real MLflow server stopped mid-sweep and restarted on the same store.

A real ``mlflow server`` (loopback, sqlite store, proxied artifacts) is started
with `orchestrator.services.up`, as ``wsss services up`` does. A tiny sweep of
two trials of the same seed, one at a time, runs against it: trial 000 while
the server is up, trial 001 is held after its first epoch (``fault_plugin``'s
``hold``); then the server is stopped (SIGTERM to its process group,
`services.down`), the trial goes on through epoch 2 without it, and is held
again while the server is restarted on the same port and store. The sweep
finishes; the driver replays the trial's journal once. The two trials differ
only in their label, so the disturbed trial's run must equal the undisturbed
one's: status, params, every metric history, the artifact listing. A rerun
replays nothing more.

Slow: about a minute and a half on 2 cores (two server starts of ~20 s each).
"""

from __future__ import annotations

import pytest
import yaml
from conftest import tiny_config_dict
from fault_plugin import fault_env, held_marker, release
from test_faults import _finish, _free_port, _wait_for, _wsss

from orchestrator.offline import REPLAYED_TAG
from orchestrator.services import Ports, down, up
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, TRIAL_TAG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, synth_root) -> dict:
    folder = tmp_path_factory.mktemp("restart")
    services, ports = folder / "services", Ports(mlflow=_free_port())
    space = {"name": "restart", "base": tiny_config_dict(synth_root), "grid": {"name": ["calm", "cut"]},
             "resources": {"cpu": 1}, "max_concurrent": 1, "max_failures": 1}  # fmt: skip
    (folder / "restart.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    trial = folder / "runs" / "restart" / "trials" / "001-cut"
    seen: dict = {"folder": folder, "trial": trial}
    uri = up(services, ports=ports, ray=False, timeout=600)["mlflow"].url  # ~20 s; far more on a loaded machine
    seen["uri"] = uri
    args = ("sweep", "restart.yaml", "--tracking-uri", uri, "--num-cpus", "2")
    # A dead server refuses at once (no retries); a live but loaded one gets 60 s per request, not fault_env's 5.
    env = fault_env("hold:001-cut:1+2") | {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    try:
        sweep = _wsss(folder, *args, env=env)
        _wait_for(lambda: held_marker(trial, 1).exists(), sweep, timeout=400)
        seen["down"] = down(services)  # SIGTERM to the server's group, as `wsss services down` does
        release(trial, 1)
        _wait_for(lambda: held_marker(trial, 2).exists(), sweep)  # epoch 2 trained with the server away
        seen["journal_lines"] = len((trial / "unsynced.jsonl").read_text().splitlines())
        up(services, ports=ports, ray=False, timeout=600)  # the same port and store
        release(trial, 2)
        seen["sweep"] = _finish(sweep, timeout=400)
        seen["runs"] = _trial_runs(uri)
        seen["rerun"] = _finish(_wsss(folder, *args, env=env))
        seen["runs_after_rerun"] = _trial_runs(uri)
    finally:
        down(services)
    return seen


def _trial_runs(uri: str) -> dict[str, dict]:
    """Trial id → what MLflow holds of its run: status, tags, params, metric histories, artifact paths."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("wsss-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent"]
    out = {}
    for run in runs:
        if run.data.tags.get(PARENT_TAG) != parent.info.run_id:
            continue
        run_id = run.info.run_id
        assert run.data.tags[TRIAL_TAG] not in out, "two runs for one trial"
        out[run.data.tags[TRIAL_TAG]] = {
            "status": run.info.status,
            "tags": run.data.tags,
            "params": run.data.params,
            "history": {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics},
            "artifacts": sorted(_artifacts(client, run_id)),
        }
    return out


def assert_same_histories(run: dict, undisturbed: dict) -> None:
    """``run`` (from `_trial_runs`) logged what ``undisturbed`` did: every metric, the same steps and values."""
    assert run["history"].keys() == undisturbed["history"].keys()
    for key, points in undisturbed["history"].items():
        assert [s for s, _ in run["history"][key]] == [s for s, _ in points], key  # one point per step, no duplicate
        if not key.endswith("_s") and "per_s" not in key:  # wall times differ; the training does not
            assert [v for _, v in run["history"][key]] == pytest.approx([v for _, v in points]), key


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_the_sweep_finishes_through_the_restart(restarted):
    code, out = restarted["sweep"]
    assert code == 0, out
    assert "2/2 trials finished" in out
    assert all(line.startswith("mlflow: stopped process group") for line in restarted["down"])
    assert restarted["journal_lines"] > 0  # epoch 2 reached the journal, not MLflow
    journal = restarted["trial"] / "unsynced.jsonl"
    assert not journal.exists() or not journal.read_text().strip()  # replayed, entries removed as sent


def test_the_disturbed_run_equals_the_undisturbed_one(restarted):
    calm, cut = restarted["runs"]["000-calm"], restarted["runs"]["001-cut"]
    assert calm["status"] == cut["status"] == "FINISHED"
    label = {k for k, v in calm["params"].items() if v != cut["params"].get(k)}
    assert label == {"name"}, label  # the grid's label, nothing else
    assert calm["params"].keys() == cut["params"].keys()
    assert_same_histories(cut, calm)
    assert cut["artifacts"] == calm["artifacts"] and cut["artifacts"]
    assert int(cut["tags"][REPLAYED_TAG]) >= restarted["journal_lines"]  # and what the trial logged after epoch 2
    assert REPLAYED_TAG not in calm["tags"]


def test_a_rerun_replays_nothing_twice(restarted):
    code, out = restarted["rerun"]
    assert code == 0, out
    before, after = restarted["runs"], restarted["runs_after_rerun"]
    assert {t: (r["status"], r["history"], r["artifacts"]) for t, r in after.items()} == {
        t: (r["status"], r["history"], r["artifacts"]) for t, r in before.items()}  # fmt: skip
    assert after["001-cut"]["tags"][REPLAYED_TAG] == before["001-cut"]["tags"][REPLAYED_TAG]

