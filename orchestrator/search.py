"""A sweep's ``search:``: Optuna's TPE suggests trials, through Ray Tune's ``OptunaSearch``.

The searcher holds no state of its own: the sweep's folder is the record.
Each suggestion builds a fresh ``OptunaSearch`` whose TPE sampler is seeded by
(``search.seed``, k), tells it every observation on disk (`observations`:
finished trials with their metric, trials an ASHA scheduler stopped as pruned,
diverged ones as failed), and asks it once. So:

- a resumed search (Ctrl-C, SIGTERM, a killed driver) suggests exactly what an
  uninterrupted one would, since nothing it knew lived only in memory, and
  never repeats a recorded suggestion (each is written to trials.json before it
  runs, and re-runs from there);
- a sequential search (``max_concurrent: 1``) is reproducible from its seed;
  with several trials in flight, what the k-th suggestion has seen depends on
  which trials finished first, as in any asynchronous search.

Trials still running are not told: TPE ignores running trials unless it
"lies" about them (``constant_liar``), so a live study would not use them either.
Known points (``grid``, ``include``) run first and are told like suggestions
when they lie inside the search space: every key they set is a ``sample:`` key
and every value is inside its distribution (`point_params`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.space import SearchSpace, TrialSpec, trial_spec
from orchestrator.sweep_dir import SweepDir

MAX_REDRAWS = 16  # a suggestion equal to a recorded trial is drawn again, this many times at most


@dataclass(frozen=True)
class Observation:
    """What the searcher is told about one settled trial.

    Attributes:
        trial_id: the sweep's id, ``NNN-<values>``.
        params: ``sample:`` key → value, inside the search space.
        value: the search metric (None unless ``state`` is complete).
        state: ``complete``, ``pruned`` (stopped early by ASHA) or ``failed`` (diverged).
    """

    trial_id: str
    params: dict[str, Any]
    value: float | None
    state: str


def distributions(sample: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``sample:`` section as Optuna distributions (``randint: [low, high]`` excludes ``high``)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, spec in sample.items():
        ((name, args),) = spec.items()
        out[key] = {
            "choice": lambda a: CategoricalDistribution(list(a)),
            "uniform": lambda a: FloatDistribution(float(a[0]), float(a[1])),
            "loguniform": lambda a: FloatDistribution(float(a[0]), float(a[1]), log=True),
            "randint": lambda a: IntDistribution(int(a[0]), int(a[1]) - 1),
        }[name](args)
    return out


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def point_params(space: SearchSpace, trial: TrialSpec) -> dict[str, Any] | None:
    """The trial as a point of the search space, or None when it lies outside.

    A suggestion sets exactly the ``sample:`` keys; a known point may set fewer
    (the base's value fills in) but no other key, since the objective then differs.
    """
    dists = distributions(space.sample)
    if not set(trial.overrides) <= set(dists):
        return None
    config = trial.config.to_dict()
    params = {key: trial.overrides.get(key, _dotted(config, key)) for key in dists}
    return params if all(_inside(dist, params[key]) for key, dist in dists.items()) else None


def _inside(dist: Any, value: Any) -> bool:
    """``value`` is one of a categorical's choices, or a number within a float/int range."""
    if hasattr(dist, "choices"):
        return value in dist.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and dist.low <= value <= dist.high


def observations(space: SearchSpace, sweep: SweepDir) -> list[Observation]:
    """Every settled trial inside the search space, in the order trials were recorded."""
    out = []
    for trial in sweep.recorded_trials():
        params = point_params(space, trial)
        folder = sweep.trial(trial.id)
        if params is None:
            continue
        if folder.finished():
            value = folder.read_metrics().get(space.search.metric)
            if isinstance(value, int | float) and math.isfinite(value):
                out.append(Observation(trial.id, params, float(value), "complete"))
            else:  # a metric the trial did not report is refused by validation; a NaN one is a failure
                out.append(Observation(trial.id, params, None, "failed"))
        elif folder.diverged.is_file():
            out.append(Observation(trial.id, params, None, "failed"))
        elif folder.stopped.is_file():
            out.append(Observation(trial.id, params, None, "pruned"))
    return out


def sampler_seed(seed: int, k: int, attempt: int = 0) -> int:
    """The TPE seed of the k-th suggestion (its ``attempt``-th draw): independent of every other."""
    return int(np.random.SeedSequence([seed, k, attempt]).generate_state(1)[0])


def optuna_search(space: SearchSpace, observed: Sequence[Observation], *, seed: int):
    """Ray Tune's ``OptunaSearch`` over ``space.sample``, told ``observed``, its TPE seeded by ``seed``."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = space.search
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.startup_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's notice that a sampler's seed overrides its own
        searcher = OptunaSearch(
            space=distributions(space.sample), metric=search.metric, mode=search.mode, sampler=sampler
        )
    for o in observed:
        searcher.add_evaluated_point(o.params, o.value, error=o.state == "failed", pruned=o.state == "pruned")
    return searcher


def suggest(space: SearchSpace, sweep: SweepDir) -> TrialSpec:
    """The next trial of the search: index = trials recorded so far, overrides = Optuna's point.

    A point equal to a recorded trial (possible over ``choice``/``randint`` only)
    is drawn again with the next seed, up to `MAX_REDRAWS` times; after that it runs
    again rather than stalling the search.
    """
    recorded = sweep.recorded_trials()
    seen = {t.config.digest() for t in recorded}
    observed = observations(space, sweep)
    k = len(recorded)
    for attempt in range(MAX_REDRAWS):
        point = optuna_search(space, observed, seed=sampler_seed(space.search.seed, k, attempt)).suggest(f"s{k}")
        trial = trial_spec(space, k, _flat(point))
        if trial.config.digest() not in seen:
            break
    return trial


def _flat(point: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """OptunaSearch nests its answer at "/"; our keys are dotted and hold none, but be exact."""
    out = {}
    for key, value in point.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


def history(observed: Sequence[Observation], mode: str) -> list[tuple[int, float | None, float | None]]:
    """(trial number from 1, its value, the best value so far) for every observation in order."""
    better = max if mode == "max" else min
    out, best = [], None
    for n, o in enumerate(observed, start=1):
        if o.value is not None:
            best = o.value if best is None else better(best, o.value)
        out.append((n, o.value, best))
    return out


def importances(space: SearchSpace, observed: Sequence[Observation]) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA, seeded) over the completed observations.

    Returns:
        {sample key: importance in [0, 1], summing to 1}, most important first;
        empty with fewer than two completed trials or a single parameter that never varied.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = [o for o in observed if o.state == "complete"]
    dists = distributions(space.sample)
    varied = [k for k in dists if len({repr(o.params[k]) for o in done}) > 1]
    if len(done) < 2 or not varied:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if space.search.mode == "max" else "minimize")
    for o in done:
        study.add_trial(optuna.trial.create_trial(params=o.params, distributions=dists, value=o.value))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=space.search.seed), params=varied)
    return {k: float(v) for k, v in found.items()}
