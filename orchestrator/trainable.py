"""One sweep trial inside a Ray worker: the same `run_trial` as ``wsss trial``, plus reporting.

The driver (`orchestrator.driver`) prepares everything trials share before any
starts and hands it over as a `SweepContext`; this module is what runs on the
workers. Tracking never fails a trial: when MLflow stops answering, the trial
goes on and journals its tracking on disk for the driver to replay (`offline`).

Tests reach into real trials through one seam, `TrialHooks`: the environment
variable ``WSSS_TRIAL_HOOKS`` names a ``module:attribute`` that builds them
(``tests/fault_plugin.py`` crashes a trial once or cuts it off from MLflow).
It is unset in normal use, and then the hooks do nothing.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cluster import HOOKS_ENV
from orchestrator.offline import JournalingTracker
from orchestrator.space import TrialSpec
from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import MlflowTracker, SweepTracking
from training.config import TrialConfig, from_dict
from training.errors import ConfigError, TrainingDiverged, WsssError
from training.trial import run_trial
from training.trial_dir import TrialDir


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver (pickled into Ray workers)."""

    sweep: SweepDir
    tracking: SweepTracking
    run_ids: dict[str, str]  # trial id → MLflow child run id
    cache: str  # synthetic data, teachers, pre-trained backbones


class TrialHooks:
    """Where a test may reach into a real trial; every hook here does nothing.

    A subclass named by ``$WSSS_TRIAL_HOOKS`` (``module:attribute``, built with
    no arguments in each trial's process) overrides the ones it needs.
    """

    def trial_started(self, trial_id: str, trial: TrialDir) -> None:
        """Called when the trial (or a retry of it) starts, its folder made, before it trains."""

    def tracker(self, trial_id: str, tracker: MlflowTracker) -> MlflowTracker:
        """The MLflow tracker the trial writes through (before it is journaled)."""
        return tracker

    def epoch_reported(self, trial_id: str, trial: TrialDir, epoch: int) -> None:
        """Called once epoch ``epoch``'s metrics and checkpoint have reached Tune."""


def load_trial_hooks() -> TrialHooks:
    """The hooks ``$WSSS_TRIAL_HOOKS`` names, or the ones that do nothing.

    Raises:
        ConfigError: the variable is not ``module:attribute``, names nothing
            importable, or names something that does not build `TrialHooks`
            (an error the hooks raise themselves passes through).
    """
    spec = os.environ.get(HOOKS_ENV, "").strip()
    if not spec:
        return TrialHooks()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{HOOKS_ENV}={spec!r}: expected module:attribute, e.g. fault_plugin:FaultHooks")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{HOOKS_ENV}={spec!r}: cannot load it ({err})") from None
    try:
        hooks = factory()
    except WsssError:
        raise  # the hooks' own clear error (a bad fault spec)
    except Exception as err:
        raise ConfigError(f"{HOOKS_ENV}={spec!r}: cannot build it ({type(err).__name__}: {err})") from None
    if not isinstance(hooks, TrialHooks):
        raise ConfigError(f"{HOOKS_ENV}={spec!r}: built a {type(hooks).__name__}; expected a TrialHooks")
    return hooks


def trial_param(t: TrialSpec) -> dict[str, Any]:
    """What a trial receives as ``config["trial"]``: its id, run name and resolved config (plain data);
    a search adds ``run_id``, the MLflow run the driver made as it suggested the trial."""
    return {"trial_id": t.id, "run_name": t.run_name, "config": json.loads(json.dumps(t.config.to_dict()))}


def sweep_trainable(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial; ``config["trial"]`` holds its id and resolved config (`trial_param`)."""
    from ray import tune

    spec = config["trial"]
    trial_id = spec["trial_id"]
    cfg = from_dict(TrialConfig, spec["config"])
    trial = context.sweep.trial(trial_id)
    if trial.diverged.is_file():  # deterministic: a retry would only diverge again
        raise TrainingDiverged(f"{trial.diverged_reason()} (not retried: deterministic)")
    if trial.finished():  # finished, but the driver stopped before Tune heard of it
        tune.report(trial.read_metrics())
        return  # the driver's `sync` closes its run
    trial.create()
    hooks = load_trial_hooks()
    hooks.trial_started(trial_id, trial)
    run_id = spec.get("run_id") or context.run_ids[trial_id]  # made by the driver (a search's: as it suggests)
    tracker = JournalingTracker(hooks.tracker(trial_id, context.tracking.trial_tracker(run_id)), trial.journal)
    tracker.set_status("RUNNING")  # a retried or restored trial reopens its run
    tracker.set_tags(_placement())
    with _restored(tune.get_checkpoint()) as resume:  # Tune's last checkpoint of this trial, if any
        if resume is None and "run_id" in spec and trial.state.is_file():
            resume = trial.checkpoint  # a search's trial: each rerun is a new Tune experiment, so its own checkpoint
        last: dict[str, float] = {}

        def report(metrics: dict[str, float], ckpt_dir: Path) -> None:
            last.update(metrics)
            tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
            hooks.epoch_reported(trial_id, trial, int(metrics["epoch"]))

        try:
            final = run_trial(
                cfg, trial.path, tracker=tracker, on_epoch=report, resume_from=resume, cache=Path(context.cache)
            )
        except TrainingDiverged as err:
            trial.mark_diverged(str(err))
            tracker.set_tags({"wsss.failure": str(err)[:5000]})
            tracker.set_status("FAILED")
            raise
        except BaseException as err:
            tracker.set_tags({"wsss.failure": f"{type(err).__name__}: {err}"[:5000]})
            tracker.set_status("FAILED")
            raise
        tune.report(last | final)
        tracker.set_status("FINISHED")


@contextmanager
def _restored(checkpoint) -> Iterator[Path | None]:
    """The folder of Tune's checkpoint ``checkpoint`` (None: none) while the trial resumes from it.

    ``as_directory``, not ``to_directory``: on local or shared storage it is the
    checkpoint's own folder, and a copy fetched from remote storage is deleted
    afterwards. ``to_directory`` left a copy of the whole state (model and
    optimiser) in the node's temporary folder at every resume.
    """
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def _placement() -> dict[str, str]:
    """Where this trial runs: on a cluster, the node to look at for its logs and its GPU."""
    import ray

    ctx = ray.get_runtime_context()
    return {"ray.node_id": ctx.get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}
