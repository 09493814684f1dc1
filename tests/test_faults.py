"""Faults: nothing lost, every error clear (see docs/reliability.md).

The fast tests check the pieces without Ray: the journal that keeps a trial's
tracking while MLflow is away, its replay, the reconciliation of runs with the
disk, SIGTERM forwarding and the test seam the faults go through
(``WSSS_TRIAL_HOOKS``, with ``tests/fault_plugin.py``). The slow ones run real
tiny sweeps under Ray, each driver in a subprocess (as a user runs it, and so
that signals and the injected faults reach only that driver and its trials):

- one sweep with a trial that crashes once, one that cannot reach MLflow and
  one whose loss turns NaN; its driver is interrupted with SIGINT, rerun,
  interrupted with SIGTERM and rerun to the end;
- a refinement actor killed with SIGKILL mid-unit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SYNTH, tiny_config_dict
from fault_plugin import CRASH_MARKER, FaultHooks, fault_env, parse_faults

from orchestrator.cli import main
from orchestrator.cluster import sigterm_as_sigint
from orchestrator.offline import REPLAYED_TAG, JournalingTracker, replay, sync_trials
from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, TRIAL_TAG, MlflowTracker, SweepTracking, default_tracking_uri
from orchestrator.trainable import HOOKS_ENV, TrialHooks, load_trial_hooks
from training.config import TrialConfig, from_dict
from training.errors import ConfigError
from training.trial_dir import TrialDir

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_space(folder: Path, space: dict) -> Path:
    path = folder / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _wsss(folder: Path, *args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``wsss ARGS`` as a user runs it, in ``folder`` (which holds mlflow.db and runs/)."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=folder, env=full_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _runs(folder: Path, sweep: str):
    """(client, parent run, {trial id: [child runs]}) of a sweep in ``folder``'s store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(folder))
    exp = client.get_experiment_by_name("wsss-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent" and r.data.tags.get("wsss.sweep") == sweep]
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get(PARENT_TAG) == parent.info.run_id:
            children.setdefault(r.data.tags[TRIAL_TAG], []).append(r)
    return client, parent, children


# ---------------------------------------------------------------- fast: the pieces


def test_fault_plugin_parses_and_rejects_unknown_kinds():
    faults = parse_faults("crash_once:000-a:1, tracking_down:001-b")
    assert faults == {"000-a": {"crash_once": "1"}, "001-b": {"tracking_down": ""}}
    with pytest.raises(ConfigError, match=r"WSSS_FAULT_INJECT: unknown fault 'explode'; expected one of crash_once"):
        parse_faults("explode:000-a")


def test_no_hooks_unless_the_variable_names_them(monkeypatch):
    monkeypatch.delenv(HOOKS_ENV, raising=False)
    hooks = load_trial_hooks()
    assert type(hooks) is TrialHooks
    tracker = MlflowTracker("sqlite:///unused.db", "run")
    assert hooks.tracker("000-a", tracker) is tracker  # the default changes nothing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fault_plugin", r"WSSS_TRIAL_HOOKS='fault_plugin': expected module:attribute"),
        ("no_such_module:Hooks", r"WSSS_TRIAL_HOOKS='no_such_module:Hooks': cannot load it \(No module named"),
        ("fault_plugin:Missing", r"cannot load it \(module 'fault_plugin' has no attribute 'Missing'\)"),
        ("fault_plugin:parse_faults", r"cannot build it \(TypeError: parse_faults\(\) missing 1 required"),
        ("fault_plugin:CRASH_MARKER", r"cannot build it \(TypeError: 'str' object is not callable\)"),
        ("collections:OrderedDict", r"built a OrderedDict; expected a TrialHooks"),
    ],
    ids=["no-colon", "no-module", "no-attribute", "needs-arguments", "not-callable", "not-hooks"],
)
def test_a_broken_hooks_variable_is_refused_by_name(monkeypatch, spec, expected):
    monkeypatch.setenv(HOOKS_ENV, spec)
    with pytest.raises(ConfigError, match=expected):
        load_trial_hooks()


def test_fault_hooks_crash_once_and_cut_tracking(monkeypatch, tmp_path):
    monkeypatch.setenv("WSSS_FAULT_INJECT", "crash_once:000-a:2,tracking_down:001-b")
    monkeypatch.setenv(HOOKS_ENV, "fault_plugin:FaultHooks")
    hooks = load_trial_hooks()
    assert isinstance(hooks, FaultHooks)
    trial = TrialDir(tmp_path / "000-a").create()
    hooks.epoch_reported("000-a", trial, 1)  # not its epoch
    with pytest.raises(RuntimeError, match="injected crash after epoch 2"):
        hooks.epoch_reported("000-a", trial, 2)
    hooks.epoch_reported("000-a", trial, 2)  # the retry goes on
    assert (trial.path / CRASH_MARKER).exists()
    live = MlflowTracker("sqlite:///unused.db", "run-b")
    dead = hooks.tracker("001-b", live)
    assert dead.run_id == "run-b" and dead.uri.startswith("http://127.0.0.1:")
    assert hooks.tracker("000-a", live) is live


def test_tracker_journals_when_the_server_is_unreachable_and_replays_later(uri, tmp_path, monkeypatch):
    """A real dead MLflow server (nothing listens on the port): the trial goes on, nothing is lost."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = MlflowTracker(f"http://127.0.0.1:{_free_port()}", "0" * 32)
    journal = TrialDir(tmp_path).journal
    tracker = JournalingTracker(dead, journal)
    (tmp_path / "metrics.json").write_text('{"miou": 0.5}')
    tracker.log_params({"transfer": {"lam": 0.5}})  # the first call fails: offline from here on
    assert tracker.offline and "MlflowException" in tracker.offline
    tracker.log_metrics({"loss": 0.7}, step=1)
    tracker.log_metrics({"loss": 0.6}, step=2)
    tracker.log_artifact(tmp_path / "metrics.json")
    tracker.set_tags({"note": "offline"})
    tracker.set_status("FINISHED")  # not journaled: derived from the disk by sync_trials
    calls = [json.loads(line)["call"] for line in journal.read_text().splitlines()]
    assert calls == ["log_params", "log_metrics", "log_metrics", "log_artifact", "set_tags"]

    tracking = SweepTracking.open(uri, "faults", "s", space={})
    run_id = tracking.child_run("t", run_name="t", params={})
    assert replay(journal, tracking.tracker(run_id)) == 5
    assert not journal.exists()
    client = tracking.client
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.7), (2, 0.6)]
    run = client.get_run(run_id)
    assert run.data.params["transfer.lam"] == "0.5" and run.data.tags["note"] == "offline"
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]


def test_replay_cut_short_resumes_without_logging_twice(tmp_path):
    class Flaky:
        def __init__(self, fail_at: int) -> None:
            self.sent: list[tuple] = []
            self.fail_at = fail_at

        def log_metrics(self, metrics, step=None):
            if len(self.sent) == self.fail_at:
                self.fail_at = -1
                raise ConnectionError("server went away again")
            self.sent.append((step, metrics["loss"]))

    journal = TrialDir(tmp_path).journal
    offline = JournalingTracker(None, journal, offline="test")
    for step in (1, 2, 3):
        offline.log_metrics({"loss": float(step)}, step=step)
    flaky = Flaky(fail_at=1)
    with pytest.raises(ConnectionError):
        replay(journal, flaky)
    assert len(journal.read_text().splitlines()) == 2  # the sent entry is gone
    assert replay(journal, flaky) == 2
    assert flaky.sent == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_replay_skips_a_line_cut_short_by_a_killed_trial(tmp_path):
    journal = TrialDir(tmp_path).journal
    JournalingTracker(None, journal, offline="test").log_metrics({"loss": 1.0}, step=1)
    with journal.open("a") as f:
        f.write('{"call": "log_metrics", "metr')
    sent = []

    class Recorder:
        def log_metrics(self, metrics, step=None):
            sent.append((step, metrics))

    assert replay(journal, Recorder()) == 1 and sent == [(1, {"loss": 1.0})]
    assert not journal.exists()


def test_sync_reconciles_runs_with_the_disk(uri, tmp_path, make_config):
    """A finished trial whose run missed its end, a diverged one left RUNNING, one still to run."""
    tracking = SweepTracking.open(uri, "faults", "sync", space={})
    cfg = make_config().to_dict()
    trials = {tid: {"config": cfg} for tid in ("000-done", "001-nan", "002-todo")}
    runs = {tid: tracking.child_run(tid, run_name=tid, params={}) for tid in trials}
    done, nan = tmp_path / "trials" / "000-done", tmp_path / "trials" / "001-nan"
    (done / "gallery").mkdir(parents=True)
    (done / "metrics.json").write_text('{"miou": 0.25, "accuracy": 0.9}')
    (done / "config.yaml").write_text("name: x\n")
    (done / "gallery" / "a.png").write_bytes(b"png")
    nan.mkdir(parents=True)
    (nan / "diverged.json").write_text('{"reason": "loss is not finite at epoch 1, step 2"}')

    assert sync_trials(SweepDir(tmp_path), tracking, trials) == ["000-done", "001-nan"]
    client = tracking.client
    finished = client.get_run(runs["000-done"])
    assert finished.info.status == "FINISHED" and finished.data.metrics == {"miou": 0.25, "accuracy": 0.9}
    assert client.get_metric_history(runs["000-done"], "miou")[0].step == cfg["train"]["epochs"]
    assert {a.path for a in client.list_artifacts(runs["000-done"])} == {"config.yaml", "metrics.json", "gallery"}
    assert client.get_run(runs["001-nan"]).info.status == "FAILED"
    assert client.get_run(runs["002-todo"]).info.status == "RUNNING"
    assert sync_trials(SweepDir(tmp_path), tracking, trials) == []  # idempotent


def test_sigterm_takes_the_ctrl_c_path():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's if an earlier test started Ray here
    with sigterm_as_sigint(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
    assert signal.getsignal(signal.SIGTERM) == before


def test_unreachable_server_at_start_fails_before_any_training(tmp_path, synth_root, monkeypatch, capsys):
    space = _write_space(tmp_path, {"name": "down", "base": tiny_config_dict(synth_root)})
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["sweep", str(space), "--tracking-uri", url]) == 2
    err = capsys.readouterr().err
    assert f"error: MLflow tracking server {url} is not reachable" in err and "mlflow server --host 127.0.0.1" in err
    assert not (tmp_path / "runs").exists()  # nothing recorded, nothing trained


# ---------------------------------------------------------------- slow: one sweep, every fault


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before it could be interrupted:\n{proc.communicate()[0]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[0]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory, synth_root) -> dict:
    """One tiny sweep, trials run one at a time, driven like a user would:

    - 000-crash crashes once right after epoch 1 (``fault_plugin``);
    - 001-offline cannot reach MLflow at all: its tracker talks to a dead port (``fault_plugin``);
    - 002-nan has lr=1e30, so its loss turns NaN at epoch 1, step 2.

    The driver gets SIGINT once 000 has finished, is rerun, gets SIGTERM once
    001 has finished, and is rerun to the end. What the user and MLflow saw
    after each step is recorded for the tests.
    """
    folder = tmp_path_factory.mktemp("faulty")
    space = {
        "name": "faulty",
        "base": tiny_config_dict(synth_root),
        "grid": {"name": ["crash", "offline"]},
        "include": [{"name": "nan", "train.lr": 1e30}],
        "resources": {"cpu": 1},
        "max_concurrent": 1,
        "max_failures": 1,
    }
    _write_space(folder, space)
    # The sweep's own temporary folder (its trials inherit it): what a resume leaves there is seen.
    (folder / "tmp").mkdir()
    inject = fault_env("crash_once:000-crash:1,tracking_down:001-offline") | {"TMPDIR": str(folder / "tmp")}
    trials = folder / "runs" / "faulty" / "trials"

    def finished() -> list[Path]:
        return sorted(trials.glob("*/metrics.json"))

    seen: dict = {"folder": folder}
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = len(finished())
        proc = _wsss(folder, "sweep", "faulty.yaml", "--num-cpus", "2", env=inject)
        _wait_for(lambda before=before: len(finished()) > before, proc)
        proc.send_signal(sig)
        code, out = _finish(proc)
        _, parent, children = _runs(folder, "faulty")
        seen[sig] = {
            "code": code, "out": out, "finished": [p.parent.name for p in finished()], "parent": parent.info.status,
            "children": {t: [r.info.status for r in runs] for t, runs in children.items()},
            "stamps": {p: p.stat().st_mtime_ns for p in finished()},
        }  # fmt: skip
    seen["code"], seen["out"] = _finish(_wsss(folder, "sweep", "faulty.yaml", "--num-cpus", "2", env=inject))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_driver_closes_its_runs_and_prints_the_resume_command(faulty_sweep, sig):
    seen = faulty_sweep[sig]
    assert seen["code"] == 3, seen["out"]
    assert "UNFINISHED: resume with\n  wsss sweep faulty.yaml --num-cpus 2" in seen["out"], seen["out"]
    assert seen["finished"] == (["000-crash"] if sig == signal.SIGINT else ["000-crash", "001-offline"])
    assert seen["parent"] == "KILLED"
    assert all(len(runs) == 1 for runs in seen["children"].values())
    statuses = {s for runs in seen["children"].values() for s in runs}
    assert "RUNNING" not in statuses and statuses <= {"FINISHED", "KILLED", "FAILED"}, seen["children"]


@pytest.mark.slow
def test_rerun_finishes_only_what_was_missing(faulty_sweep):
    code, out = faulty_sweep["code"], faulty_sweep["out"]
    assert code == 3, out  # not complete: one trial diverged
    assert "sweep faulty: 2/3 trials finished, 1 failed" in out, out
    assert "failed: 002-nan-lr1e_30: loss is not finite at epoch 1, step 2" in out, out
    assert "UNFINISHED" not in out  # nothing to resume: a NaN trial would only diverge again
    for sig in (signal.SIGINT, signal.SIGTERM):  # trials finished before an interruption were not rerun
        for path, stamp in faulty_sweep[sig]["stamps"].items():
            assert path.stat().st_mtime_ns == stamp, path
    _, parent, children = _runs(faulty_sweep["folder"], "faulty")
    assert sorted(children) == ["000-crash", "001-offline", "002-nan-lr1e_30"]
    assert all(len(runs) == 1 for runs in children.values())  # retries and restores reuse their run
    assert parent.info.status == "FAILED" and parent.data.tags["wsss.failed_trials"] == "002-nan-lr1e_30"


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint_with_the_same_metrics(faulty_sweep, tmp_path):
    from training.trial import run_trial

    folder = faulty_sweep["folder"]
    trial = folder / "runs" / "faulty" / "trials" / "000-crash"
    assert (trial / CRASH_MARKER).exists()
    client, _, children = _runs(folder, "faulty")
    (run,) = children["000-crash"]
    assert run.info.status == "FINISHED"
    assert "injected crash after epoch 1" in run.data.tags["wsss.failure"]  # the attempt that crashed
    # Resumed, not restarted: epoch 1 was trained (and logged) once.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    recorded = json.loads((folder / "runs" / "faulty" / "trials.json").read_text())["000-crash"]["config"]
    clean = run_trial(from_dict(TrialConfig, recorded), tmp_path / "clean")
    assert json.loads((trial / "metrics.json").read_text()) == clean
    # Resumed from the checkpoint in place: no copy of it left in the node's temporary folder.
    assert not list((folder / "tmp").glob("checkpoint_tmp_*"))


@pytest.mark.slow
def test_nan_trial_is_failed_in_tune_and_mlflow_and_not_retried(faulty_sweep):
    folder = faulty_sweep["folder"]
    trial = folder / "runs" / "faulty" / "trials" / "002-nan-lr1e_30"
    reason = json.loads((trial / "diverged.json").read_text())["reason"]
    assert reason.startswith("loss is not finite at epoch 1, step 2: {'loss': nan")
    assert not (trial / "metrics.json").exists()
    _, _, children = _runs(folder, "faulty")
    (run,) = children["002-nan-lr1e_30"]
    assert run.info.status == "FAILED" and run.data.tags["wsss.failure"] == reason
    errors = list((folder / "runs" / "faulty" / "tune").glob("002-nan-lr1e_30*/error.txt"))
    assert errors and "loss is not finite" in errors[0].read_text()  # Tune's own record: ERROR
    assert "not retried: deterministic" in errors[0].read_text()


@pytest.mark.slow
def test_trial_that_could_not_reach_mlflow_is_logged_by_the_driver(faulty_sweep):
    folder = faulty_sweep["folder"]
    trial = folder / "runs" / "faulty" / "trials" / "001-offline"
    assert not (trial / "unsynced.jsonl").exists()  # replayed and removed
    client, _, children = _runs(folder, "faulty")
    (run,) = children["001-offline"]
    assert run.info.status == "FINISHED" and int(run.data.tags[REPLAYED_TAG]) > 0
    assert json.loads((trial / "metrics.json").read_text()).items() <= run.data.metrics.items()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert {"config.yaml", "metrics.json", "gallery"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_rerunning_a_settled_sweep_retrains_nothing(faulty_sweep, monkeypatch, capsys):
    folder = faulty_sweep["folder"]
    root = folder / "runs" / "faulty"

    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in [*root.glob("trials/*/metrics.json"), *root.glob("tune/**/*")]}

    before = stamps()
    monkeypatch.chdir(folder)
    assert main(["sweep", "faulty.yaml", "--num-cpus", "2"]) == 3
    assert "2/3 trials finished, 1 failed" in capsys.readouterr().out
    assert stamps() == before  # settled (finished or diverged): no Ray, no Tune restore, no training


# ---------------------------------------------------------------- slow: a refinement actor SIGKILLed


def _fake_trial(trial: Path, data: Path) -> None:
    """A trial folder as refinement reads it: config + CAM shards of 8 images (blurred ground truth)."""
    import cv2
    import numpy as np

    from training.config import DataConfig, save_config
    from training.data import read_mask, scan_test
    from training.shards import write_shards

    trial.mkdir(parents=True)
    save_config(TrialConfig(name=trial.name, data=DataConfig(root=str(data), synth=TINY_SYNTH)), trial / "config.yaml")
    items = scan_test(data)
    shape = (TINY_SYNTH.size, TINY_SYNTH.size)
    cams = [cv2.GaussianBlur(read_mask(i.mask, shape=shape).astype(np.float32), (0, 0), 3) for i in items]
    labels = np.array([int(c.max() > 0.5) for c in cams])
    write_shards(trial / "cams", [i.id for i in items], cams, labels - 0.5, labels, shard_size=8)


def fault_the_next_busy_actor(monkeypatch, fault) -> dict:
    """Once an actor has answered (its process is up), ``fault`` the actor just handed a unit.

    ``fault`` gets the actor's GCS record (``Pid``, ``Address.NodeID``) and returns what it
    did; the dict returned here fills with that and the unit's ``index`` once it has run.
    """
    import ray

    from orchestrator import refine_actors

    feed, done = refine_actors._Dispatcher._feed, {}

    def feed_then_fault(self):
        feed(self)
        if done or not self.replies:
            return
        slot, index = list(self.in_flight.values())[-1]  # the unit just handed to that actor
        done.update(fault(ray._private.state.actors(slot.actor._actor_id.hex())), index=index)

    monkeypatch.setattr(refine_actors._Dispatcher, "_feed", feed_then_fault)
    return done


def assert_one_unit_redone_once(results: list, units: list, faulted: int) -> None:
    """Exactly one unit ran twice, none more, and every unit is done.

    Usually the one just handed to the faulted actor; on a loaded machine that unit
    can finish while the actor is being looked up, and then the next unit the dead
    actor is given is the one requeued. Either way the fault costs one unit, not more.
    """
    attempts = [r.attempts for r in results]
    assert sorted(attempts) == [1] * (len(units) - 1) + [2], attempts
    assert attempts.index(2) >= faulted
    assert all(r.status == "done" for r in results) and len(results) == len(units)


@pytest.mark.slow
def test_sigkilled_refinement_actor_costs_only_its_unit(tmp_path, monkeypatch, synth_root):
    """The SIGKILL variant of tests/test_refine.py::test_killed_actor_costs_only_its_unit."""
    import ray
    from test_refine import CRF, _table

    from orchestrator.refine import make_units, refine_reference, refine_units, summarise

    for copy in ("clean", "killed"):
        _fake_trial(tmp_path / copy / "trial-a", synth_root)
    reference = refine_reference(make_units({"trial-a": tmp_path / "clean" / "trial-a"}, [CRF]))

    def sigkill(actor: dict) -> dict:
        assert actor["Pid"] and actor["Pid"] != os.getpid()
        os.kill(actor["Pid"], signal.SIGKILL)
        return {"pid": actor["Pid"]}

    killed = fault_the_next_busy_actor(monkeypatch, sigkill)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, log_to_driver=False)
    try:
        units = make_units({"trial-a": tmp_path / "killed" / "trial-a"}, [CRF])  # 3 shards × (seed, CRF)
        results = refine_units(units, cpu_actors=2, progress=False)
    finally:
        ray.shutdown()
    assert killed, "no actor was killed"
    assert_one_unit_redone_once(results, units, killed["index"])
    assert _table(summarise(results)) == _table(summarise(reference))  # nothing counted twice
