"""A search under Ray Tune: a ``Searcher`` that hands Tune the sweep's trials one at a time.

`SweepSearcher` first re-issues the recorded trials not yet settled (known
points, and suggestions an interrupted run made but did not finish), in their
order, then asks `orchestrator.search.suggest` for new ones until the budget
(``search.num_trials``) is recorded. Before a new suggestion reaches Tune it is
made ready in the driver like a grid's trials in `driver.prepare`: written to
trials.json, its teacher pinned, its data made, its MLflow child run created.

A search always starts a new Tune experiment instead of restoring Tune's own
state: the sweep's folder is the record (see `orchestrator.search`), and a
trial cut short resumes from its own checkpoint (`trainable.sweep_trainable`).
With ASHA, the scheduler's stop decisions are written down (``stopped.json``) so
the searcher hears of them as pruned trials, and a rerun does not train them again.

Imported only when a search runs (`tuner.run_trials`), so Ray loads at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from orchestrator.search import suggest
from orchestrator.space import SearchSpace, TrialSpec
from orchestrator.trainable import SweepContext, trial_param
from training.pretrain import resolve_pretrained
from training.trial import ensure_teacher, prepare_data

STOPPED_TAG = "wsss.stopped"  # on the run of a trial the scheduler stopped early


def search_settings(space: SearchSpace, trials: list[TrialSpec], ctx: SweepContext) -> tuple[Any, int]:
    """The ``search_alg`` and ``num_samples`` of this run's ``TuneConfig``.

    Args:
        trials: every recorded trial, in order (as `driver.prepare` made them ready).
    """
    status = ctx.sweep.status()
    settled = {*status.finished, *status.failed, *status.stopped}
    pending = [t for t in trials if t.id not in settled]
    to_suggest = max(0, space.search.num_trials - len(trials))
    searcher = SweepSearcher(space, ctx, pending)
    if space.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)
    return searcher, len(pending) + to_suggest


class SweepSearcher(Searcher):
    """Re-issues the pending recorded trials, then suggests new ones (see the module docstring)."""

    def __init__(self, space: SearchSpace, ctx: SweepContext, pending: list[TrialSpec]) -> None:
        # No metric for Tune: it would demand search.metric in every epoch's report, and only the final one
        # holds it; the metric is read from the trials' metrics.json (`orchestrator.search.observations`).
        super().__init__(metric=None, mode=None)
        self.space, self.ctx = space, ctx
        self.queue = list(pending)
        self.run_ids = dict(ctx.run_ids)
        self._issued: dict[str, dict[str, Any]] = {}  # Tune's trial id → what it was handed

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.queue:
            trial = self.queue.pop(0)
        elif len(self.ctx.sweep.load_trials()) >= self.space.search.num_trials:
            return self.FINISHED
        else:
            trial = self._admit(suggest(self.space, self.ctx.sweep))
        self._issued[trial_id] = spec = trial_param(trial) | {"run_id": self.run_ids[trial.id]}
        return {"trial": spec}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Close the run of a trial ASHA stopped, show the best trial so far; nothing to keep in memory:
        every observation is read from disk when needed."""
        from orchestrator.offline import tracking_errors
        from orchestrator.search_report import report_progress

        spec = self._issued.pop(trial_id, None)
        try:
            reason = self.ctx.sweep.trial(spec["trial_id"]).stopped_reason() if spec else None
            if reason is not None:  # Tune ends the trial's process: its run would stay RUNNING
                self.ctx.tracking.tracker(spec["run_id"]).set_tags({STOPPED_TAG: reason})
                self.ctx.tracking.finish(spec["run_id"], "KILLED")
            report_progress(self.space, self.ctx.sweep, self.ctx.tracking)
        except tracking_errors():
            pass  # MLflow away: the summary at the end of the sweep (or its rerun) shows it

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: trials.json and the trial folders are the searcher's state (Tune skips the file)."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a search starts a new Tune experiment and rebuilds from the sweep folder."""

    def _admit(self, trial: TrialSpec) -> TrialSpec:
        """Record a new suggestion and make what it needs, in the driver, before Tune runs it."""
        cfg, cache, sweep = trial.config, Path(self.ctx.cache), self.ctx.sweep
        if cfg.transfer.paradigm_info.frozen_teacher and not cfg.transfer.teacher_checkpoint:
            pinned = sweep.pin_teacher(ensure_teacher(cfg, cache))
            cfg = cfg.replace(**{"transfer.teacher_checkpoint": str(pinned)})
        trial = TrialSpec(trial.id, trial.overrides, cfg)
        sweep.record_suggestion(trial)  # first: a rerun never suggests it again
        resolve_pretrained(cfg, cache)
        prepare_data(cfg.data, cache)
        self.run_ids[trial.id] = self.ctx.tracking.child_run(trial.id, run_name=trial.run_name, params=cfg.to_dict())
        return trial


class RecordingASHA(ASHAScheduler):
    """ASHA on the per-epoch metric, writing each trial it stops early into the trial's folder."""

    def __init__(self, space: SearchSpace, ctx: SweepContext) -> None:
        s = space.scheduler
        super().__init__(
            time_attr="epoch", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
            reduction_factor=s.reduction_factor, max_t=10_000,
        )  # fmt: skip
        self.sweep, self.reason = ctx.sweep, f"stopped by ASHA on {s.metric}"

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            folder = self.sweep.trial(trial.config["trial"]["trial_id"])
            if not folder.finished():
                epoch = int(result.get("epoch", 0))
                folder.mark_stopped(f"{self.reason} at epoch {epoch}", epoch=epoch)
        return decision
