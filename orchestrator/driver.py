"""The sweep driver: ``wsss sweep`` from a search space to its tables, one step after another.

`run_sweep` reads top to bottom:

1. **plan**: check the tracking store, expand the trials, record them in the
   sweep's folder (`SweepDir`); nothing is trained and no run is created yet;
2. **prepare**: if trials are left to run, start Ray and check the cluster; then
   make what trials share, in the driver, so they never race for it: the MLflow
   parent and child runs, the data, the frozen teachers, pre-trained backbones;
3. **run**: the pending trials under Ray Tune (`tuner.run_trials`);
4. **outcome**: how the sweep stands on disk, with MLflow brought up to date
   (journals replayed, runs closed, tables logged);
5. **refine**: once every trial finished, the ``refine:`` section's pipelines
   over the CAM shards (skipped when this very refinement already completed);
6. **summarise**: the parent run's description and best metrics, and the
   sweep's two-line reading (which arm won, by how much, where each arm looks).

A rerun goes through the same steps: finished trials are skipped on disk, so a
settled sweep (every trial finished or diverged) starts no Ray and trains
nothing, and only brings MLflow and the tables up to date.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cluster import NodeWatch, RaySession, check_cluster
from orchestrator.console import EpochLines, SweepConsole, duration, showing
from orchestrator.offline import sync_trials, tracking_errors
from orchestrator.space import SearchSpace, TrialSpec, check_checkpoints, expand
from orchestrator.sweep_dir import SweepDir, SweepStatus
from orchestrator.tracking import TRIAL_TAG, SweepTracking, TrackingUnavailable, check_reachable, store_exists
from orchestrator.trainable import SweepContext, load_trial_hooks
from orchestrator.tuner import run_trials
from training.errors import ConfigError, WsssError
from training.pretrain import resolve_pretrained
from training.tracker import ConsoleTracker
from training.trial import cache_root, ensure_teacher, prepare_data, teacher_run_dir

EXPERIMENT = "wsss-sweeps"


@dataclass
class SweepOutcome:
    """How a sweep ended: its trials' status on disk and the tables it logged."""

    name: str
    sweep: SweepDir
    status: SweepStatus
    tables: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # trial id → why Tune gave up on it (this run)
    reading: str = ""  # the two-line finding (orchestrator.reading), printed under the tables

    @property
    def complete(self) -> bool:
        return self.status.complete


def run_sweep(
    space: SearchSpace,
    *,
    name: str,
    storage: Path,
    tracking_uri: str,
    address: str | None = None,
    storage_is_shared: bool = False,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> SweepOutcome:
    """Run every unfinished trial of ``space``, then refine and summarise.

    Args:
        space: the validated search space.
        name: sweep name (storage folder and MLflow parent run).
        storage: folder holding ``<name>/``; on a multi-node cluster it must be
            shared by every node (NFS), and ``storage_is_shared`` must say so.
        tracking_uri: MLflow tracking URI (an ``http://`` server on a cluster).
        address: an existing Ray cluster (``auto`` or ``host:port``); None = local.
        storage_is_shared: ``storage`` is mounted on every node of the cluster.
        num_cpus: CPUs of a local Ray instance (default: all).
        verbose: Ray's and Tune's own output too (default: their warnings, and the
            sweep's console: a line per trial and a bar, `orchestrator.console`).
    """
    sweep = SweepDir.of(storage, name)
    trials = plan(space, sweep, tracking_uri)
    console = sweep_console(name, trials, sweep)
    prepared = None
    # One driver per sweep (the lock refuses a second one, naming the first); Ray inside it.
    with sweep.lock(), RaySession(address, num_cpus, verbose=verbose) as ray:
        try:
            pending = not sweep.status().settled  # diverged trials are not retried: they would diverge again
            if pending:  # Ray, and the cluster checked, before any training (teachers train in prepare)
                check_cluster(ray.start().nodes(), space.resources, storage_is_shared=storage_is_shared)
            prepared = prepare(space, name, sweep, tracking_uri, trials, console)
            errors = {}
            if pending:
                # NodeWatch: a lost node makes the sweep wait with a message, then stop
                with showing(console), NodeWatch(space.resources, sweep=name, nodes=ray.nodes, say=console.say):
                    errors = trial_errors(run_trials(space, prepared.trials, prepared.context, verbose=verbose))
            outcome = settle(space, name, prepared)
            outcome.errors = {t: e for t, e in errors.items() if t not in outcome.status.finished}
            if outcome.complete and space.refine:
                outcome.tables |= refine(space, prepared, ray, console)
            summarise(space, name, prepared, outcome)
        except BaseException as err:
            close_runs_after(err, prepared.tracking if prepared else None, tracking_uri, name)
            raise
    if not outcome.complete:
        prepared.tracking.close_dangling("KILLED")  # an interrupted Tune leaves the runs of its trials open
    return outcome


# ---------------------------------------------------------------- 1, 2: plan and prepare


@dataclass(frozen=True)
class Prepared:
    """What `prepare` made: the trials as they will run (teachers pinned) and what they share."""

    trials: list[TrialSpec]
    context: SweepContext

    @property
    def sweep(self) -> SweepDir:
        return self.context.sweep

    @property
    def tracking(self) -> SweepTracking:
        return self.context.tracking


def plan(space: SearchSpace, sweep: SweepDir, tracking_uri: str) -> list[TrialSpec]:
    """Check the tracking store, then expand and record the trials (no training, no runs yet)."""
    check_reachable(tracking_uri)
    load_trial_hooks()  # a broken test seam fails here, before Ray, not in every trial
    trials = expand(space)  # a search's known points; its suggestions so far come back from `record`
    check_checkpoints(trials)
    return sweep.record(space, trials)


def prepare(
    space: SearchSpace, name: str, sweep: SweepDir, tracking_uri: str, trials: list[TrialSpec], console: SweepConsole
) -> Prepared:
    """Set up what trials share (MLflow runs, data, teachers, pre-trained backbones) in the driver."""
    tracking = SweepTracking.open(
        tracking_uri, EXPERIMENT, name, space=space.raw, description=sweep_description(space, name, len(trials))
    )
    cache = cache_root()
    trials = _with_teachers(trials, sweep, cache, console)
    for t in trials:  # pre-train each backbone a trial names once here, not in racing trials
        resolve_pretrained(t.config, cache)
    for cfg in {t.config.data for t in trials}:
        prepare_data(cfg, cache)
    status = sweep.status()
    _note_orphans(tracking, name, console)
    run_ids = {t.id: _child(tracking, t, {*status.finished, *status.failed, *status.stopped}) for t in trials}
    return Prepared(trials, SweepContext(sweep, tracking, run_ids, str(cache)))


def _note_orphans(tracking: SweepTracking, name: str, console: SweepConsole) -> None:
    """Say which runs a driver that died (SIGKILL, a lost login node) left RUNNING.

    This driver holds the sweep's lock, so no trial of the sweep runs now: a
    RUNNING run is an orphan. Each is reused by its trial (one run per trial,
    its epochs logged once) and ends FINISHED or FAILED with it, or KILLED if
    this run is interrupted too.
    """
    orphans = sorted(r.data.tags.get(TRIAL_TAG, "?") for r in tracking.child_runs() if r.info.status == "RUNNING")
    if orphans:
        console.say(f"sweep {name}: {len(orphans)} MLflow run(s) left RUNNING by a driver that did not close them "
                    f"(killed?): {', '.join(orphans)}; each is reused by its trial")  # fmt: skip


def _with_teachers(trials: list[TrialSpec], sweep: SweepDir, cache: Path, console: SweepConsole) -> list[TrialSpec]:
    """Train (or reuse) each distinct teacher once, copy it into the sweep folder
    (shared storage on a cluster) and pin its path in the trials' configs."""
    out = []
    for t in trials:
        cfg = t.config
        if cfg.transfer.paradigm_info.frozen_teacher and not cfg.transfer.teacher_checkpoint:
            label = f"teacher {cfg.model.teacher.name} (for {t.id})"
            lines = EpochLines(console, label, cfg.train.teacher_epochs,
                               ConsoleTracker(teacher_run_dir(cfg, cache), stream=None))  # fmt: skip
            pinned = sweep.pin_teacher(ensure_teacher(cfg, cache, tracker=lines))
            cfg = cfg.replace(**{"transfer.teacher_checkpoint": str(pinned)})
        out.append(TrialSpec(t.id, t.overrides, cfg))
    sweep.rewrite_configs(out)
    return out


def _child(tracking: SweepTracking, t: TrialSpec, settled: set[str]) -> str:
    """The trial's MLflow run; created now (not by racing trials), and the run of a
    finished or diverged trial is only looked up, never reopened."""
    found = tracking.find_child(t.id) if t.id in settled else None
    if found is not None:
        return found.info.run_id
    return tracking.child_run(t.id, run_name=t.run_name, params=t.config.to_dict())


def sweep_description(space: SearchSpace, name: str, n_trials: int) -> str:
    """The sweep file's description, or a plain one."""
    if space.search is not None:  # its budget, not the trials suggested so far
        n_trials = space.search.num_trials
    return space.description or f"Sweep `{name}` from {space.source.name}: {n_trials} trials."


# ---------------------------------------------------------------- 4, 5, 6: outcome, refine, summarise


def settle(space: SearchSpace, name: str, ctx: Prepared) -> SweepOutcome:
    """How the sweep stands on disk, with MLflow brought up to date (tables, statuses)."""
    from orchestrator.tables import log_tables

    sweep, tracking = ctx.sweep, ctx.tracking
    outcome = SweepOutcome(name, sweep, sweep.status())
    if outcome.complete:
        sweep.mark_done(outcome.status)
    try:
        sync_trials(sweep, tracking, sweep.load_trials())  # what trials could not log while MLflow was away
        rows = sweep.result_rows()
        outcome.tables = log_tables(tracking.parent, rows, list(space.tables)) if rows else {}
        if outcome.complete:
            tracking.parent.set_status("FINISHED")
        elif outcome.status.settled:
            tracking.parent.set_tags({"wsss.failed_trials": ",".join(outcome.status.failed)})
            tracking.parent.set_status("FAILED")
    except tracking_errors() as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TrackingUnavailable(
            f"MLflow at {tracking.uri} stopped answering ({first}). Nothing is lost: every finished trial's "
            f"results are on disk in {sweep.root}/trials/<id>/ (metrics.json, config.yaml, gallery/, and "
            "unsynced.jsonl for what it could not log). Rerun the same `wsss sweep` command once the server "
            "is back: finished trials are not retrained, and their runs, metrics and tables are logged then."
        ) from None
    return outcome


def refine(space: SearchSpace, ctx: Prepared, ray: RaySession, console: SweepConsole) -> dict[str, str]:
    """Refine after the grid unless this refinement already completed (then reuse its tables).

    A refinement cut short is resumed: its finished units are skipped on disk.
    """
    from orchestrator.refine_sweep import refine_sweep, refined_tables

    done = refined_tables(space.refine, ctx.sweep)
    if done is not None:
        return done
    ray.start()
    section = space.refine
    console.say(f"refine: {len(section.pipelines)} pipeline(s) on trials {section.trials}, on Ray actors")
    start = console.clock()
    tables = refine_sweep(section, ctx.sweep, ctx.tracking, progress=console.live)  # a bar on a terminal only
    console.say(f"refine: done in {duration(console.clock() - start)}")
    return tables


def trial_errors(results) -> dict[str, str]:
    """Trial id → the error Tune gave up on it with (its last attempt's), from ``Tuner.fit``'s results."""
    errors = {}
    for result in results:
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error  # a RayTaskError wraps the trial's own
            text = str(cause).strip() or type(cause).__name__
            errors[Path(result.path).name] = f"{type(cause).__name__}: {text.splitlines()[0][:500]}"
    return errors


def summarise(space: SearchSpace, name: str, ctx: Prepared, outcome: SweepOutcome) -> None:
    """The parent run's description and best metrics in MLflow (what the UI shows first), and
    ``outcome.reading``, the finding in two lines."""
    from orchestrator.reading import read_result
    from orchestrator.summary import describe_sweep

    rows = ctx.sweep.result_rows()
    outcome.reading = read_result(rows)
    tables, rank = dict(outcome.tables), {}
    if space.search is not None:
        from orchestrator.search_report import search_tables

        tables |= search_tables(space, ctx.sweep, ctx.tracking)
        rank = {"rank_by": space.search.metric, "mode": space.search.mode}
    if rows:
        describe_sweep(
            ctx.tracking, description=sweep_description(space, name, outcome.status.total), rows=rows,
            total=outcome.status.total, failed=outcome.status.failed, tables=tables, **rank,
        )  # fmt: skip


def close_runs_after(err: BaseException, tracking: SweepTracking | None, tracking_uri: str, name: str) -> None:
    """Leave no MLflow run RUNNING after the driver stops early (Ctrl-C twice, SIGTERM, an error)."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    if tracking is None and not store_exists(tracking_uri):
        return  # stopped before any run was created; do not create a database just to look
    try:
        tracking = tracking or SweepTracking.find(tracking_uri, name, EXPERIMENT)
        closed = tracking.close_dangling(status)
    except (WsssError, *tracking_errors()):
        return  # no sweep in MLflow yet, or MLflow is the problem; a rerun reopens and closes the runs
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left running as {status}", file=sys.stderr)


# ---------------------------------------------------------------- what the user reads


def sweep_console(name: str, trials: list[TrialSpec], sweep: SweepDir) -> SweepConsole:
    """The sweep's console, with what earlier runs settled on disk already shown."""
    console = SweepConsole(name, [(t.id, t.config.train.epochs) for t in trials])
    status = sweep.status()
    for trial_id in status.finished:
        console.settled_earlier(trial_id, metrics=sweep.trial(trial_id).read_metrics())
    for trial_id in status.failed:
        console.settled_earlier(trial_id, reason=sweep.failure_reason(trial_id))
    return console


def print_outcome(outcome: SweepOutcome, *, command: str, stream=None) -> None:
    """The tables, then whether the sweep is complete and what to run next."""
    stream = stream or sys.stdout
    for title, text in outcome.tables.items():
        print(f"\n## {title}\n\n{text.rstrip()}", file=stream)
    status = outcome.status
    print(f"\nsweep {outcome.name}: {len(status.finished)}/{status.total} trials finished, "
          f"{len(status.failed)} failed", file=stream)  # fmt: skip
    for trial_id in status.failed:
        print(f"failed: {trial_id}: {outcome.sweep.failure_reason(trial_id)}", file=stream)
    for trial_id, error in outcome.errors.items():  # failed this run, every retry spent; a rerun tries again
        if trial_id not in status.failed:
            print(f"error: {trial_id}: {error}", file=stream)
    if not status.settled:
        print(f"UNFINISHED: resume with\n  {command}", file=stream)
    print(f"outputs in {outcome.sweep.root}", file=stream)


def require_sweep(sweep: SweepDir) -> None:
    """``--resume``: the sweep must exist already."""
    if not sweep.exists():
        raise ConfigError(f"--resume: no sweep at {sweep.root}")
