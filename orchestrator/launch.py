"""Start (or resume) a sweep under Ray Tune and report how it ended."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from orchestrator import sweep as sw
from orchestrator.space import SearchSpace, TrialSpec
from training.errors import ConfigError, WsssError


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
    trials, ctx = sw.prepare(space, name, storage, tracking_uri)
    finished, _, total = sw.status(root)
    if len(finished) == total:
        return _outcome(space, name, root, ctx)
    _init_ray(address, num_cpus, root)
    try:
        _check_cluster(space, storage_is_shared)
        _fit(space, trials, ctx, root)
        outcome = _outcome(space, name, root, ctx)
        if outcome.complete and space.refine:
            from orchestrator.refine_sweep import refine_sweep

            outcome.tables |= refine_sweep(space.refine, root, ctx.tracking)
    finally:
        import ray

        ray.shutdown()
    if not outcome.complete:
        ctx.tracking.close_dangling("KILLED")
    return outcome


def _outcome(space: SearchSpace, name: str, root: Path, ctx: sw.SweepContext) -> sw.SweepOutcome:
    finished, failed, total = sw.status(root)
    tables = sw.publish_tables(space, root, ctx.tracking)
    outcome = sw.SweepOutcome(name, root, total, finished, failed, tables)
    if outcome.complete:
        sw.mark_done(root, outcome)
        ctx.tracking.finish(ctx.tracking.parent_run_id, "FINISHED")
    return outcome


def _init_ray(address: str | None, num_cpus: int | None, root: Path) -> None:
    import ray

    # Trials write only absolute paths, so keep every worker in the driver's cwd.
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(env)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING")
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=300 * 1024 * 1024,  # trials pass paths, not arrays
        runtime_env={"env_vars": env},
        logging_level="WARNING",
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


def _tune_config(space: SearchSpace):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = space.scheduler
    scheduler = None
    if s.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
            reduction_factor=s.reduction_factor, max_t=10_000,
        )  # fmt: skip
    return tune.TuneConfig(
        scheduler=scheduler,
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
    if outcome.failed:
        print(f"failed: {', '.join(outcome.failed)}", file=stream)
    if done + len(outcome.failed) < outcome.total:
        print(f"UNFINISHED: resume with\n  {command}", file=stream)
    print(f"outputs in {outcome.root}", file=stream)


def require_space_match(root: Path) -> None:
    if not (root / "trials.json").is_file():
        raise ConfigError(f"--resume: no sweep at {root}")
