"""Start (or resume) a sweep under Ray Tune and report how it ended."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from orchestrator import sweep as sw
from orchestrator.space import SearchSpace, TrialSpec
from orchestrator.tracking import TrackingUnavailable
from training.config import names
from training.config.sweep import SchedulerSpec
from training.errors import ConfigError, WsssError
from training.registry import Registry

# Passed on to trials: the test-only fault hook, and how long MLflow retries a dead server.
PASSED_ENV = (sw.FAULT_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


SCHEDULERS: Registry = Registry("scheduler", names=names.SCHEDULERS)  # scheduler.type → Tune scheduler


class ClusterError(WsssError):
    """The Ray cluster cannot run this sweep as configured."""


def run_sweep(
    space: SearchSpace,
    *,
    name: str,
    storage: Path,
    tracking_uri: str,
    address: str | None = None,
    storage_is_shared: bool = False,
    num_cpus: int | None = None,
) -> sw.SweepOutcome:
    """Run every unfinished trial of ``space``; finished sweeps only print tables.

    Args:
        space: the validated search space.
        name: sweep name (storage folder and MLflow parent run).
        storage: folder holding ``<name>/``; on a multi-node cluster it must be
            shared by every node (NFS), and ``storage_is_shared`` must say so.
        tracking_uri: MLflow tracking URI (an ``http://`` server on a cluster).
        address: an existing Ray cluster (``auto`` or ``host:port``); None = local.
        num_cpus: CPUs of a local Ray instance (default: all).
    """
    root = sw.sweep_root(storage, name)
    trials = sw.plan(space, name, storage, tracking_uri)
    finished, failed, total = sw.status(root)
    if len(finished) + len(failed) == total:  # diverged trials are not retried: they would diverge again
        _, ctx = sw.prepare(space, name, storage, tracking_uri, trials)
        outcome = _outcome(space, name, root, ctx)
        if outcome.complete and space.refine:
            outcome.tables |= _refine_once(space, root, ctx, address=address, num_cpus=num_cpus)
        _summarise(space, name, root, ctx, outcome)
        return outcome
    ctx = None
    _init_ray(address, num_cpus, root)
    with _sigterm_as_sigint():  # after ray.init, which installs its own SIGTERM handler in the driver
        try:
            _check_cluster(space, storage_is_shared)  # before any training
            trials, ctx = sw.prepare(space, name, storage, tracking_uri, trials)
            _fit(space, trials, ctx, root)
            outcome = _outcome(space, name, root, ctx)
            if outcome.complete and space.refine:
                outcome.tables |= _refine_once(space, root, ctx)
            _summarise(space, name, root, ctx, outcome)
        except BaseException as err:
            _close_runs_after(err, ctx, tracking_uri, name)
            raise
        finally:
            import ray

            ray.shutdown()
    if not outcome.complete:
        ctx.tracking.close_dangling("KILLED")
    return outcome


def _summarise(space: SearchSpace, name: str, root: Path, ctx: sw.SweepContext, outcome: sw.SweepOutcome) -> None:
    """The parent run's description and best metrics in MLflow (what the UI shows first)."""
    from orchestrator.summary import describe_sweep

    rows = sw.result_rows(root)
    if rows:
        describe_sweep(
            ctx.tracking, description=sw.sweep_description(space, name, outcome.total), rows=rows,
            total=outcome.total, failed=outcome.failed, tables=outcome.tables,
        )  # fmt: skip


def _refine_once(space: SearchSpace, root: Path, ctx: sw.SweepContext, **ray_args) -> dict[str, str]:
    """Refine after the grid unless this refinement already completed (then reuse its tables).

    A refinement cut short is resumed: its finished units are skipped on disk.
    """
    import ray

    from orchestrator.refine_sweep import refine_sweep, refined_tables

    done = refined_tables(space.refine, root)
    if done is not None:
        return done
    started = not ray.is_initialized()
    if started:
        _init_ray(ray_args.get("address"), ray_args.get("num_cpus"), root)
    try:
        return refine_sweep(space.refine, root, ctx.tracking)
    finally:
        if started:
            ray.shutdown()


def _outcome(space: SearchSpace, name: str, root: Path, ctx: sw.SweepContext) -> sw.SweepOutcome:
    """How the sweep stands on disk, with MLflow brought up to date (tables, statuses)."""
    from orchestrator.offline import tracking_errors

    finished, failed, total = sw.status(root)
    outcome = sw.SweepOutcome(name, root, total, finished, failed, {})
    if outcome.complete:
        sw.mark_done(root, outcome)
    tracking = ctx.tracking
    try:
        sw.sync(root, tracking)
        outcome.tables = sw.publish_tables(space, root, tracking)
        if outcome.complete:
            tracking.parent.set_status("FINISHED")
        elif len(finished) + len(failed) == total:
            tracking.parent.set_tags({"wsss.failed_trials": ",".join(failed)})
            tracking.parent.set_status("FAILED")
    except tracking_errors() as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TrackingUnavailable(
            f"MLflow at {tracking.uri} stopped answering ({first}). Nothing is lost: every finished trial's "
            f"results are on disk in {root}/trials/<id>/ (metrics.json, config.yaml, gallery/, and "
            "unsynced.jsonl for what it could not log). Rerun the same `wsss sweep` command once the server "
            "is back: finished trials are not retrained, and their runs, metrics and tables are logged then."
        ) from None
    return outcome


def _close_runs_after(err: BaseException, ctx: sw.SweepContext | None, tracking_uri: str, name: str) -> None:
    """Leave no MLflow run RUNNING after the driver stops early (Ctrl-C twice, SIGTERM, an error)."""
    from orchestrator.offline import tracking_errors
    from orchestrator.tracking import SweepTracking, store_exists

    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    if ctx is None and not store_exists(tracking_uri):
        return  # stopped before any run was created; do not create a database just to look
    try:
        tracking = ctx.tracking if ctx else SweepTracking.find(tracking_uri, name, sw.EXPERIMENT)
        closed = tracking.close_dangling(status)
    except (WsssError, *tracking_errors()):
        return  # no sweep in MLflow yet, or MLflow is the problem; a rerun reopens and closes the runs
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left running as {status}", file=sys.stderr)


@contextmanager
def _sigterm_as_sigint():
    """SIGTERM (`kill`, a batch scheduler, `ray job stop`) takes the graceful path of Ctrl-C.

    Tune handles SIGINT by saving its state and returning from ``fit``, after
    which the driver closes the runs left open and prints the resume command.
    Outside ``fit`` the SIGINT handler raises KeyboardInterrupt, handled alike.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        # None: the previous handler was installed from C (Ray's crash logger) and cannot be put back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _init_ray(address: str | None, num_cpus: int | None, root: Path) -> None:
    import ray

    # Trials write only absolute paths, so keep every worker in the driver's cwd.
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(env)
    # Per-epoch checkpoints are small and frequent by design; Tune's warning about them is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    env |= {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    address = address or _job_cluster()
    if address:  # workers' logs stay on their nodes, as below (Tune reports a failing trial's error)
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=False)
        return
    ray.init(
        # "local": a new instance even while a `ray start` cluster runs on this machine (which a
        # bare ray.init() would join, and then refuse num_cpus).
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=300 * 1024 * 1024,  # trials pass paths, not arrays
        runtime_env={"env_vars": env},
        logging_level="WARNING",
        # Workers' own logs ("Checkpoint successfully created" each epoch) stay in Ray's log
        # folder; a failing trial is still reported by Tune with its error file.
        log_to_driver=False,
    )


def _job_cluster() -> str | None:
    """Inside `ray job submit`, Ray sets RAY_ADDRESS to the cluster's GCS: join it, do not start one."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard (Jobs API) address; a sweep joins a cluster by its GCS "
            "address (--address host:port) or runs inside `ray job submit --address <that URL> -- wsss sweep ...`"
        )
    return address or None


def in_ray_job() -> bool:
    """True in the driver of a job submitted with a working_dir (its cwd is a temporary copy)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except ValueError:
        return False


def check_job_outputs(storage: Path, tracking_uri_given: bool) -> None:
    """Refuse outputs that would vanish with a job's temporary working directory."""
    if not in_ray_job():
        return
    if not storage.is_absolute():
        raise ConfigError(
            f"--storage {storage}: inside a Ray job the working directory is a temporary copy that Ray "
            "deletes; give an absolute path every node can reach (shared storage on a multi-node cluster)"
        )
    if not tracking_uri_given:
        raise ConfigError(
            "--tracking-uri: inside a Ray job the default (sqlite in the working directory) would be deleted "
            "with it; pass the MLflow server, e.g. --tracking-uri http://127.0.0.1:5000 "
            "(or set MLFLOW_TRACKING_URI; `wsss services up` sets it for its jobs)"
        )


def _check_cluster(space: SearchSpace, storage_is_shared: bool) -> None:
    """Fail fast on what would otherwise hang or lose results on a cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage_is_shared:
        raise ClusterError(
            f"the Ray cluster has {len(nodes)} nodes but --storage is a local path: trials on other nodes "
            "would write where the driver cannot read. Mount shared storage (NFS) on every node, point "
            "--storage at it and pass --storage-is-shared"
        )
    want = space.resources
    best_cpu = max(n["Resources"].get("CPU", 0) for n in nodes)
    best_gpu = max(n["Resources"].get("GPU", 0) for n in nodes)
    if want.cpu > best_cpu or want.gpu > best_gpu:
        raise ClusterError(
            f"resources: each trial asks for cpu={want.cpu}, gpu={want.gpu}, but the largest node has "
            f"cpu={best_cpu:g}, gpu={best_gpu:g}; no trial could ever start"
        )


def _fit(space: SearchSpace, trials: list[TrialSpec], ctx: sw.SweepContext, root: Path) -> None:
    from ray import tune

    pending = {t.id for t in trials} - set(sw.status(root)[0])
    trainable = tune.with_resources(tune.with_parameters(sw.sweep_trainable, context=ctx), space.resources.as_ray())
    # Each trial's whole spec is one grid value: ids and configs stay ours, not Ray's.
    param_space = {"trial": tune.grid_search([_trial_param(t) for t in trials if t.id in pending])}
    tune_dir = root / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space, tune_config=_tune_config(space), run_config=_run_config(space, root)
        )
    tuner.fit()


def _trial_param(t: TrialSpec) -> dict:
    return {"trial_id": t.id, "run_name": t.run_name, "config": json.loads(json.dumps(t.config.to_dict()))}


@SCHEDULERS.register("none")
def _no_scheduler(s: SchedulerSpec) -> None:
    return None


@SCHEDULERS.register("asha")
def _asha(s: SchedulerSpec):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
        reduction_factor=s.reduction_factor, max_t=10_000,
    )  # fmt: skip


def _tune_config(space: SearchSpace):
    from ray import tune

    return tune.TuneConfig(
        scheduler=SCHEDULERS.get(space.scheduler.type)(space.scheduler),
        max_concurrent_trials=space.max_concurrent or None,
        trial_name_creator=_trial_id,
        trial_dirname_creator=_trial_id,
    )


def _trial_id(trial) -> str:
    """Ray's names for a trial are ours, so its folders and logs read like the sweep."""
    return trial.config["trial"]["trial_id"]


def _run_config(space: SearchSpace, root: Path):
    from ray import tune

    return tune.RunConfig(
        name="tune",
        storage_path=str(root),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=1,
    )


def print_outcome(outcome: sw.SweepOutcome, *, command: str, stream=None) -> None:
    """The tables, then whether the sweep is complete and what to run next."""
    stream = stream or sys.stdout
    for title, text in outcome.tables.items():
        print(f"\n## {title}\n\n{text}", file=stream)
    done = len(outcome.finished)
    print(f"\nsweep {outcome.name}: {done}/{outcome.total} trials finished, {len(outcome.failed)} failed", file=stream)
    for trial_id in outcome.failed:
        print(f"failed: {trial_id}: {sw.failure_reason(outcome.root, trial_id)}", file=stream)
    if done + len(outcome.failed) < outcome.total:
        print(f"UNFINISHED: resume with\n  {command}", file=stream)
    print(f"outputs in {outcome.root}", file=stream)


def require_space_match(root: Path) -> None:
    if not (root / "trials.json").is_file():
        raise ConfigError(f"--resume: no sweep at {root}")
