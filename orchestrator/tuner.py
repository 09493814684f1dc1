"""The run step of a sweep: its pending trials under Ray Tune.

Trials are expanded by the project (`orchestrator.space`), not by Ray, so each
pending trial's whole spec is one value of a grid: ids, configs and run names
stay ours. What Tune varies is chosen in `_param_space`; a searcher that
suggests trials instead of enumerating them plugs in beside it.
"""

from __future__ import annotations

from typing import Any

from orchestrator.space import SearchSpace, TrialSpec
from orchestrator.trainable import SweepContext, sweep_trainable, trial_param
from training.config import names
from training.config.sweep import SchedulerSpec
from training.registry import Registry

SCHEDULERS: Registry = Registry("scheduler", names=names.SCHEDULERS)  # scheduler.type → Tune scheduler


def run_trials(space: SearchSpace, trials: list[TrialSpec], ctx: SweepContext, *, verbose: bool = False):
    """Run (or, after an interruption, restore and go on with) the trials not finished on disk.

    Returns Tune's results (a ``ResultGrid``: each trial's error, if it ended in
    one) when every trial has ended, or early on Ctrl-C / SIGTERM, with Tune's
    state saved in the sweep's ``tune/`` folder for the next run. Tune's own
    reporter is silent unless ``verbose``; its trial events reach the active
    `orchestrator.console` either way. A restored sweep keeps the verbosity and
    callbacks it started with (Tune restores them from its saved state).
    """
    from ray import tune

    from orchestrator.tune_events import tune_output

    finished = set(ctx.sweep.status().finished)
    pending = [t for t in trials if t.id not in finished]
    trainable = tune.with_resources(tune.with_parameters(sweep_trainable, context=ctx), space.resources.as_ray())
    tune_dir = str(ctx.sweep.tune)
    if space.search is not None:  # always a new experiment: the sweep folder holds the search (`search_tune`)
        from orchestrator.search_tune import RecordingASHA, search_settings

        searcher, num_samples = search_settings(space, trials, ctx)
        scheduler = RecordingASHA(space, ctx) if space.scheduler.type == "asha" else None
        config = _tune_config(space, search_alg=searcher, num_samples=num_samples, scheduler=scheduler)
        tuner = tune.Tuner(trainable, tune_config=config, run_config=_run_config(space, ctx, verbose=verbose))
    elif tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(pending), tune_config=_tune_config(space),
            run_config=_run_config(space, ctx, verbose=verbose),
        )  # fmt: skip
    with tune_output(verbose):
        return tuner.fit()


def _param_space(trials: list[TrialSpec]) -> dict[str, Any]:
    from ray import tune

    return {"trial": tune.grid_search([trial_param(t) for t in trials])}


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


def _tune_config(space: SearchSpace, *, scheduler=None, **search):
    from ray import tune

    return tune.TuneConfig(
        scheduler=scheduler or SCHEDULERS.get(space.scheduler.type)(space.scheduler),
        max_concurrent_trials=None if search else space.max_concurrent or None,  # a search: its ConcurrencyLimiter
        **search,
        trial_name_creator=_trial_id,
        trial_dirname_creator=_trial_id,
    )


def _trial_id(trial) -> str:
    """Ray's names for a trial are ours, so its folders and logs read like the sweep."""
    return trial.config["trial"]["trial_id"]


def _run_config(space: SearchSpace, ctx: SweepContext, *, verbose: bool = False):
    from ray import tune

    from orchestrator.tune_events import ConsoleCallback

    tune_dir = ctx.sweep.tune
    return tune.RunConfig(
        name=tune_dir.name,
        storage_path=str(tune_dir.parent),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[ConsoleCallback()],
        verbose=1 if verbose else 0,  # 0: Tune prints only its errors; the console shows the trials
    )
