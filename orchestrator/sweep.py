"""Run a search space under Ray Tune, every trial tracked in MLflow.

Layout of a sweep's storage folder ``<storage>/<name>/``:

- ``space.yaml``: the sweep file as given; ``trials.json``: the expanded trials
  with their resolved configs (what ``wsss trial --from-sweep`` reruns);
- ``trials/<id>/``: each trial's outputs (config, metrics, checkpoint, CAM shards);
- ``teachers/``: frozen teachers used by teacher_student trials;
- ``tune/``: Ray Tune's own experiment state (restored on rerun);
- ``done.json``: written when every trial has finished.

The driver prepares what trials share (data, teachers, the MLflow parent and
child runs) before any trial starts, so trials never race to create them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.offline import JOURNAL, JournalingTracker, sync_trials
from orchestrator.space import SearchSpace, TrialSpec, arm, check_checkpoints, expand
from orchestrator.tracking import SweepTracking, check_reachable, flatten
from training.atomic import atomic_write_text
from training.config import TrialConfig, from_dict
from training.errors import ConfigError, TrainingDiverged
from training.pretrain import resolve_pretrained
from training.trial import cache_root, ensure_teacher, prepare_data, run_trial

EXPERIMENT = "wsss-sweeps"
DIVERGED = "diverged.json"
FAULT_ENV = "WSSS_FAULT_INJECT"
FAULT_KINDS = ("crash_once", "tracking_down")


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver (pickled into Ray workers)."""

    root: str  # absolute sweep folder
    tracking: SweepTracking
    run_ids: dict[str, str]  # trial id → MLflow child run id
    cache: str  # synthetic data + teacher cache

    def trial_dir(self, trial_id: str) -> Path:
        return Path(self.root) / "trials" / trial_id


@dataclass
class SweepOutcome:
    name: str
    root: Path
    total: int
    finished: list[str]
    failed: list[str]
    tables: dict[str, str]

    @property
    def complete(self) -> bool:
        return len(self.finished) == self.total


# ---------------------------------------------------------------- the trainable


def sweep_trainable(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: the same `run_trial` as ``wsss trial``, plus reporting.

    Tracking never fails a trial: when MLflow stops answering, the trial goes on
    and journals its tracking on disk for the driver to replay (`offline`).
    """
    from ray import tune

    spec = config["trial"]
    trial_id = spec["trial_id"]
    cfg = from_dict(TrialConfig, spec["config"])
    out = context.trial_dir(trial_id)
    _refuse_if_diverged(out)
    if (out / "metrics.json").is_file():  # finished, but the driver stopped before Tune heard of it
        tune.report(json.loads((out / "metrics.json").read_text()))
        return  # the driver's `sync` closes its run
    out.mkdir(parents=True, exist_ok=True)
    faults = injected_faults(trial_id)
    down = "injected by WSSS_FAULT_INJECT" if "tracking_down" in faults else None
    run_id = context.run_ids[trial_id]  # created by the driver, never by racing trials
    tracker = JournalingTracker(context.tracking.tracker(run_id), out / JOURNAL, offline=down)
    tracker.set_status("RUNNING")  # a retried or restored trial reopens its run
    tracker.set_tags(_placement())
    checkpoint = tune.get_checkpoint()
    resume = Path(checkpoint.to_directory()) if checkpoint else None
    last: dict[str, float] = {}

    def report(metrics: dict[str, float], ckpt_dir: Path) -> None:
        last.update(metrics)
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        _crash_once_if_injected(faults, out, int(metrics["epoch"]))

    try:
        final = run_trial(cfg, out, tracker=tracker, on_epoch=report, resume_from=resume, cache=Path(context.cache))
    except TrainingDiverged as err:
        atomic_write_text(out / DIVERGED, json.dumps({"reason": str(err)}))
        tracker.set_tags({"wsss.failure": str(err)[:5000]})
        tracker.set_status("FAILED")
        raise
    except BaseException as err:
        tracker.set_tags({"wsss.failure": f"{type(err).__name__}: {err}"[:5000]})
        tracker.set_status("FAILED")
        raise
    tune.report(last | final)
    tracker.set_status("FINISHED")


def _placement() -> dict[str, str]:
    """Where this trial runs: on a cluster, the node to look at for its logs and its GPU."""
    import ray

    ctx = ray.get_runtime_context()
    return {"ray.node_id": ctx.get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


def _refuse_if_diverged(out: Path) -> None:
    """A diverged trial is deterministic: retrying it would only diverge again."""
    marker = out / DIVERGED
    if marker.is_file():
        raise TrainingDiverged(json.loads(marker.read_text())["reason"] + " (not retried: deterministic)")


def injected_faults(trial_id: str) -> dict[str, str]:
    """Test-only faults for ``trial_id`` from ``$WSSS_FAULT_INJECT`` (kind → argument).

    The variable holds comma-separated ``kind:trial_id[:arg]`` items:
    ``crash_once:<id>:<epoch>`` raises once, right after that epoch's checkpoint
    is reported; ``tracking_down:<id>`` makes the trial's MLflow calls fail from
    the start. Tests set it in the driver's environment; Ray passes it to trials.
    """
    faults = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, rest = item.strip().partition(":")
        target, _, arg = rest.partition(":")
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{FAULT_ENV}: unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if target == trial_id:
            faults[kind] = arg
    return faults


def _crash_once_if_injected(faults: dict[str, str], out: Path, epoch: int) -> None:
    if faults.get("crash_once") != str(epoch):
        return
    marker = out / ".injected-crash_once"
    if not marker.exists():  # the retry must not crash again
        marker.touch()
        raise RuntimeError(f"injected crash after epoch {epoch} ({FAULT_ENV})")


# ---------------------------------------------------------------- the driver


def sweep_root(storage: Path, name: str) -> Path:
    return (Path(storage) / name).resolve()


def plan(space: SearchSpace, name: str, storage: Path, tracking_uri: str) -> list[TrialSpec]:
    """Check the tracking store, then expand and record the trials (no training yet)."""
    check_reachable(tracking_uri)
    trials = expand(space)
    check_checkpoints(trials)
    _record(sweep_root(storage, name), space, trials)
    return trials


def prepare(
    space: SearchSpace, name: str, storage: Path, tracking_uri: str, trials: list[TrialSpec] | None = None
) -> tuple[list[TrialSpec], SweepContext]:
    """Set up what trials share (MLflow runs, data, teachers, pre-trained backbones) in the driver.

    Args:
        trials: from `plan`; planned here when None.
    """
    root = sweep_root(storage, name)
    trials = plan(space, name, storage, tracking_uri) if trials is None else trials
    description = sweep_description(space, name, len(trials))
    tracking = SweepTracking.open(tracking_uri, EXPERIMENT, name, space=space.raw, description=description)
    cache = cache_root()
    trials = _with_teachers(trials, root, cache)
    for t in trials:  # pre-train each backbone a trial names once here, not in racing trials
        resolve_pretrained(t.config, cache)
    for cfg in {t.config.data for t in trials}:
        prepare_data(cfg, cache)
    finished, failed, _ = status(root)
    run_ids = {t.id: _child(tracking, t, {*finished, *failed}) for t in trials}
    return trials, SweepContext(str(root), tracking, run_ids, str(cache))


def _child(tracking: SweepTracking, t: TrialSpec, settled: set[str]) -> str:
    """The trial's MLflow run; created now (not by racing trials), and the run of a
    finished or diverged trial is only looked up, never reopened."""
    found = tracking.find_child(t.id) if t.id in settled else None
    if found is not None:
        return found.info.run_id
    return tracking.child_run(t.id, run_name=t.run_name, params=t.config.to_dict())


def sync(root: Path, tracking: SweepTracking) -> list[str]:
    """Log to MLflow what trials could not while it was unreachable (see `offline`)."""
    return sync_trials(root, tracking, load_trials(root), DIVERGED)


def _record(root: Path, space: SearchSpace, trials: list[TrialSpec]) -> None:
    """Write space.yaml and trials.json; refuse to reuse a name for another space."""
    root.mkdir(parents=True, exist_ok=True)
    listing = {t.id: {"overrides": t.overrides, "config": t.config.to_dict(), "run_name": t.run_name} for t in trials}
    path = root / "trials.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: v["overrides"] for k, v in old.items()} != {k: v["overrides"] for k, v in listing.items()}:
            raise ConfigError(
                f"sweep folder {root} holds another search space; choose another --name or remove the folder"
            )
        return
    # The base is stored resolved, so the folder alone can rebuild the space.
    resolved = {k: v for k, v in space.raw.items() if k != "set"} | {"base": space.base}
    atomic_write_text(root / "space.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_text(path, json.dumps(listing, indent=1))


def _with_teachers(trials: list[TrialSpec], root: Path, cache: Path) -> list[TrialSpec]:
    """Train (or reuse) each distinct teacher once, copy it into the sweep folder
    (shared storage on a cluster) and pin its path in the trials' configs."""
    out = []
    for t in trials:
        cfg = t.config
        if cfg.transfer.paradigm_info.frozen_teacher and not cfg.transfer.teacher_checkpoint:
            cached = ensure_teacher(cfg, cache)
            pinned = root / "teachers" / cached.name
            if not pinned.is_file():
                pinned.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cached, pinned)
            cfg = cfg.replace(**{"transfer.teacher_checkpoint": str(pinned)})
        out.append(TrialSpec(t.id, t.overrides, cfg))
    _rewrite_configs(root, out)
    return out


def _rewrite_configs(root: Path, trials: list[TrialSpec]) -> None:
    listing = json.loads((root / "trials.json").read_text())
    for t in trials:
        listing[t.id]["config"] = t.config.to_dict()
    atomic_write_text(root / "trials.json", json.dumps(listing, indent=1))


def load_trials(root: Path) -> dict[str, dict[str, Any]]:
    """The recorded trials of a sweep folder (id → overrides, config, run_name)."""
    path = Path(root) / "trials.json"
    if not path.is_file():
        raise ConfigError(f"{root}: not a sweep folder (no trials.json); expected <storage>/<name>")
    return json.loads(path.read_text())


def result_rows(root: Path) -> list[dict[str, Any]]:
    """One flat row per finished trial: resolved config keys + metrics + labels."""
    rows = []
    for trial_id, rec in load_trials(root).items():
        metrics_file = Path(root) / "trials" / trial_id / "metrics.json"
        if not metrics_file.is_file():
            continue
        cfg = from_dict(TrialConfig, rec["config"])
        row: dict[str, Any] = {k: _number_or_text(v) for k, v in flatten(rec["config"]).items()}
        row |= {"trial_id": trial_id, "run_name": rec["run_name"], "arm": arm(cfg)}
        row |= json.loads(metrics_file.read_text())
        rows.append(row)
    return rows


def _number_or_text(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def status(root: Path) -> tuple[list[str], list[str], int]:
    """(finished ids, failed ids, total) from what is on disk."""
    trials = load_trials(root)
    finished = [t for t in trials if (Path(root) / "trials" / t / "metrics.json").is_file()]
    failed = [t for t in trials if t not in finished and (Path(root) / "trials" / t / DIVERGED).is_file()]
    return finished, failed, len(trials)


def failure_reason(root: Path, trial_id: str) -> str:
    """Why a failed trial stopped, from its ``diverged.json``."""
    marker = Path(root) / "trials" / trial_id / DIVERGED
    return json.loads(marker.read_text())["reason"] if marker.is_file() else "unknown"


def sweep_description(space: SearchSpace, name: str, n_trials: int) -> str:
    """The sweep file's description, or a plain one."""
    return space.description or f"Sweep `{name}` from {space.source.name}: {n_trials} trials."


def publish_tables(space: SearchSpace, root: Path, tracking: SweepTracking) -> dict[str, str]:
    """Build every table and plot from finished trials and log them on the parent run."""
    from orchestrator.tables import log_tables

    rows = result_rows(root)
    return log_tables(tracking.parent, rows, list(space.tables)) if rows else {}


def mark_done(root: Path, outcome: SweepOutcome) -> None:
    atomic_write_text(root / "done.json", json.dumps({"finished": outcome.finished, "total": outcome.total}))
