"""The ``search:`` section of a sweep file, and the metrics trials report.

A sweep with ``search:`` does not enumerate its trials: a search algorithm
suggests them one at a time over the ``sample:`` distributions, learning from
each result, until ``num_trials`` trials have run. ``grid:`` and ``include:``
become known points that run first (the baselines, the thesis's λ = 1); a
known point inside the search space is told to the searcher like any
suggestion. Example::

    search: {algorithm: optuna, metric: val_miou, mode: max, num_trials: 24, seed: 0}

What a search or an ASHA scheduler may read is what trials report, listed
here once (`EPOCH_METRICS`, `FINAL_METRICS`): a metric no trial reports would
leave a search blind and an ASHA scheduler stopping nothing. Settings are chosen
on the validation split: with one (``data.val_fraction`` > 0) a test metric is
refused, since searching on it is tuning on the test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from training.config.parse import check_int
from training.errors import ConfigError, did_you_mean
from training.registry import Registry

SEARCH_ALGORITHMS: Registry[str] = Registry.of("search algorithm", {
    "optuna": "Optuna's TPE sampler through Ray Tune's OptunaSearch (random for the first startup_trials)",
})  # fmt: skip

# Reported after every epoch (`training.evaluate.quick_eval`, `training.validation.quick_validation`):
# what an ASHA scheduler reads. ``val_*`` only with a validation split.
EPOCH_METRICS = ("test_accuracy", "test_miou_1x", "val_accuracy", "val_miou_1x")
# Reported once a trial finishes (`training.metrics.cam_scores`, `subset_accuracy`), on the test split and,
# with a validation split, as ``val_<name>``. context_* need context masks, accuracy_* the synthetic subsets.
FINAL_METRICS = (
    "miou", "miou_per_image", "best_threshold", "miou_best_threshold", "oracle_miou", "accuracy",
    "context_activation", "context_fp", "accuracy_coupled", "accuracy_decoupled",
)  # fmt: skip
VALIDATION_PREFIX = "val_"


def reported_metrics(*, per_epoch: bool) -> tuple[str, ...]:
    """Every metric name a trial may report: per epoch only, or at any point (the final report
    holds the last epoch's metrics too)."""
    final = (*FINAL_METRICS, *(VALIDATION_PREFIX + m for m in FINAL_METRICS))
    return EPOCH_METRICS if per_epoch else tuple(dict.fromkeys((*EPOCH_METRICS, *final)))


def on_validation(metric: str) -> bool:
    """True for a metric of the validation split (``val_*``); every other metric is a test metric."""
    return metric.startswith(VALIDATION_PREFIX)


def check_metric(metric: str, *, field: str, val_fraction: float, per_epoch: bool) -> str | None:
    """Check that trials report ``metric`` and that choosing on it is not choosing on the test set.

    Args:
        metric: e.g. ``val_miou``.
        field: where it was written (``search.metric``), for the messages.
        val_fraction: the base config's ``data.val_fraction``.
        per_epoch: the reader needs the metric every epoch (ASHA), not only at the end.

    Returns:
        A warning to print (a test metric without a validation split), or None.

    Raises:
        ConfigError: an unreported metric (the valid ones listed), a validation metric
            without a split, or a test metric while a validation split exists.
    """
    valid = reported_metrics(per_epoch=per_epoch)
    if metric not in valid:
        when = "every epoch" if per_epoch else "at the end of a trial or every epoch"
        raise ConfigError(
            f"{field}: no trial reports {metric!r}{did_you_mean(metric, valid)}; metrics reported {when}: "
            f"{', '.join(valid)}"
        )
    if on_validation(metric) and val_fraction <= 0:
        raise ConfigError(
            f"{field}: {metric} is measured on the validation split, and the base config holds none "
            "(data.val_fraction is 0); set data.val_fraction (e.g. 0.2), or name a test metric knowingly"
        )
    if not on_validation(metric) and val_fraction > 0:
        raise ConfigError(
            f"{field}: {metric} is measured on the test split, and choosing settings on it is tuning on the "
            f"test set; the base config holds out a validation split (data.val_fraction {val_fraction:g}): "
            f"use {VALIDATION_PREFIX}{metric.removeprefix('test_')} instead"
        )
    if not on_validation(metric):
        return (
            f"{field}: {metric} is a test metric and there is no validation split, so this chooses settings on "
            "the test set: its best score is optimistic. Set data.val_fraction to choose on held-out images."
        )
    return None


@dataclass(frozen=True)
class SearchSpec:
    """The ``search:`` section: which algorithm suggests trials, on what, and how many.

    Attributes:
        algorithm: a name in `SEARCH_ALGORITHMS`.
        metric: the final (or last-epoch) metric the search optimises; a validation metric
            when the base holds out a validation split (`check_metric`).
        mode: ``max`` or ``min``.
        num_trials: the budget: every trial the sweep runs, its known points included.
        seed: the sampler's seed; the k-th suggestion draws from a generator seeded by
            (seed, k), so a rerun with the same results suggests the same trials.
        startup_trials: suggestions drawn at random before TPE models the results (known
            points inside the space count towards them).
    """

    num_trials: int
    algorithm: str = "optuna"
    metric: str = "val_miou"
    mode: str = "max"
    seed: int = 0
    startup_trials: int = 4

    def __post_init__(self) -> None:
        SEARCH_ALGORITHMS.check(self.algorithm, field="search.algorithm")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"search.mode: expected max or min, got {self.mode!r}")
        check_int("search.num_trials", self.num_trials, low=1, what="the trial budget, known points included")
        check_int("search.seed", self.seed, low=0)
        check_int("search.startup_trials", self.startup_trials, low=0)

    @classmethod
    def from_dict(cls, section: Any) -> SearchSpec:
        """Validate a ``search:`` mapping.

        Raises:
            ConfigError: not a mapping, an unknown or missing key, or a bad value (named ``search.<key>``).
        """
        keys = [f.name for f in fields(cls)]
        if not isinstance(section, Mapping):
            raise ConfigError(f"search: expected a mapping with keys {', '.join(keys)}, got {section!r}")
        for key in section:
            if key not in keys:
                raise ConfigError(f"search.{key}: unknown key{did_you_mean(str(key), keys)}; valid: {', '.join(keys)}")
        if "num_trials" not in section:
            raise ConfigError("search.num_trials: missing; the trial budget (every trial, known points included)")
        if not isinstance(section.get("metric", cls.metric), str):
            raise ConfigError(f"search.metric: expected a metric name, got {section['metric']!r}")
        return cls(**section)
