"""Search spaces: a validated sweep file → a deterministic list of trials.

What a sweep file may say is the schema's (`training.config.sweep`, read by
`load_space`). Expansion happens here, not in Ray, so ``wsss validate`` knows
the exact trials, their ids are stable across restores, and a sweep's trial can
be rebuilt anywhere from its id.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.config import names
from training.config.parse import apply_overrides, from_dict
from training.config.sweep import SearchSpace, load_space
from training.config.trial import TrialConfig
from training.errors import CheckpointError, ConfigError
from training.registry import Registry

__all__ = ["SearchSpace", "TrialSpec", "arm", "check_checkpoints", "expand", "load_space", "run_name", "trial_spec"]

SAMPLERS: Registry = Registry("sampler", names=names.SAMPLERS)


@SAMPLERS.register("choice")
def _choice(rng: np.random.Generator, args: list) -> Any:
    return args[int(rng.integers(len(args)))]


@SAMPLERS.register("uniform")
def _uniform(rng: np.random.Generator, args: list) -> float:
    return float(rng.uniform(args[0], args[1]))


@SAMPLERS.register("loguniform")
def _loguniform(rng: np.random.Generator, args: list) -> float:
    return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))


@SAMPLERS.register("randint")
def _randint(rng: np.random.Generator, args: list) -> int:
    return int(rng.integers(args[0], args[1]))


@dataclass(frozen=True)
class TrialSpec:
    """One expanded trial: a stable id, its overrides and its resolved config."""

    id: str
    overrides: dict[str, Any]
    config: TrialConfig

    @property
    def run_name(self) -> str:
        return run_name(self.config, self.overrides)


# ---------------------------------------------------------------- expansion


def _axis_points(key: str, value: Any) -> dict[str, Any]:
    keys = key.split(",")
    return dict(zip(keys, value, strict=True)) if len(keys) > 1 else {key: value}


def expand(space: SearchSpace) -> list[TrialSpec]:
    """Every trial of the space, in a stable order, duplicates removed.

    With ``search:``, the known points only (``grid`` × ``include``, nothing drawn
    from ``sample``): the searcher suggests the rest while the sweep runs.

    Raises:
        ConfigError: naming the trial's overrides when one resolves to a bad config,
            or a search whose known points leave nothing of its budget to suggest.
    """
    if space.search is not None:
        return _known_points(space)
    rng = np.random.default_rng(space.sample_seed)
    keys = list(space.grid)
    points: list[dict[str, Any]] = []
    for values in itertools.product(*(space.grid[k] for k in keys)):
        for _ in range(space.num_samples):
            drawn = {
                k: SAMPLERS.get(name)(rng, args) for k, spec in space.sample.items() for name, args in spec.items()
            }
            points.append(_grid_point(keys, values) | drawn)
    points.extend(dict(i) for i in space.include)
    return _resolve(space, points)


def _grid_point(keys: list[str], values: tuple) -> dict[str, Any]:
    return {k: v for key, value in zip(keys, values, strict=True) for k, v in _axis_points(key, value).items()}


def _known_points(space: SearchSpace) -> list[TrialSpec]:
    keys = list(space.grid)
    points = [_grid_point(keys, values) for values in itertools.product(*(space.grid[k] for k in keys))] if keys else []
    trials = _resolve(space, [*points, *(dict(i) for i in space.include)])
    if len(trials) >= space.search.num_trials:
        raise ConfigError(
            f"{space.source}: search.num_trials: {space.search.num_trials} leaves nothing to suggest after the "
            f"{len(trials)} known points (grid × include) that run first; expected more than {len(trials)}"
        )
    return trials


def _resolve(space: SearchSpace, points: list[dict[str, Any]]) -> list[TrialSpec]:
    trials, seen = [], set()
    for overrides in points:
        trial = trial_spec(space, len(trials), overrides)
        if trial.config.digest() in seen:
            continue
        seen.add(trial.config.digest())
        trials.append(trial)
    return trials


def trial_spec(space: SearchSpace, index: int, overrides: dict[str, Any]) -> TrialSpec:
    """The ``index``-th trial of ``space``: the base with ``overrides``, id ``NNN-<values>``.

    Raises:
        ConfigError: naming the overrides when they resolve to a bad config.
    """
    data = apply_overrides(space.base, overrides)
    train = data.setdefault("train", {})
    if not train.get("threads"):
        train["threads"] = max(1, int(space.resources.cpu))  # one intra-op thread per CPU a trial owns
    try:
        cfg = from_dict(TrialConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{space.source}: trial with {overrides}: {err}") from None
    return TrialSpec(f"{index:03d}-{_tag(overrides)}", overrides, cfg)


def check_checkpoints(trials: list[TrialSpec]) -> None:
    """Fail before any trial starts when a checkpoint file named by a trial is missing.

    Checked where the driver runs: on a cluster, weights must sit on storage every
    node mounts at the same path. Whether a file *is* a checkpoint is checked when
    a trial loads it (`training.models.load_weights`), with the same kind of message.

    Raises:
        CheckpointError: naming each key, path and the trials that use it.
    """
    missing: dict[str, list[str]] = {}
    for t in trials:
        for key, value in _checkpoint_paths(t.config):
            if not Path(value).expanduser().is_file():
                missing.setdefault(f"{key}={value}", []).append(t.id)
    if missing:
        found = "; ".join(f"{k} (trial {', '.join(ids[:3])}{', …' * (len(ids) > 3)})" for k, ids in missing.items())
        raise CheckpointError(
            f"checkpoint file does not exist: {found}; expected a .pt/.pth/.bin/.safetensors file "
            "(for pretrained: also true or false)"
        )


def _checkpoint_paths(cfg: TrialConfig) -> list[tuple[str, str]]:
    paths = [(f"model.{net}.pretrained", getattr(cfg.model, net).pretrained) for net in ("teacher", "student")]
    # only files: `pretrain:` references and registered weights names are checked when the config
    # is built (the named file ships inside an installed package), true/false name no file
    paths = [(k, v) for k, v in paths if names.pretrained_kind(v) == "file"]
    if cfg.transfer.teacher_checkpoint:
        paths.append(("transfer.teacher_checkpoint", cfg.transfer.teacher_checkpoint))
    return paths


def _tag(overrides: dict[str, Any]) -> str:
    """A readable id suffix from the override values, e.g. ``co_training-l1-lam0.5``."""
    parts = []
    for key, value in overrides.items():
        last = key.rsplit(".", 1)[-1]
        if value is None:  # a section left out (scd: null)
            continue
        if isinstance(value, dict):  # a whole section (scd: {...}) is named, not spelled out
            parts.append(last)
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{last}{text}" if isinstance(value, int | float) and not isinstance(value, bool) else text)
    tag = "-".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)[:80]


def run_name(cfg: TrialConfig, overrides: dict[str, Any]) -> str:
    """What the MLflow UI shows: paradigm · metric · level · λ (plus other varied keys)."""
    t = cfg.transfer
    if not t.paradigm_info.transfer:
        head = f"{t.paradigm} · {'CNN' if t.cam_network == 'teacher' else 'ViT'} ({cfg.cam_net.name})"
    else:
        head = f"{t.paradigm} · {t.metric} · {t.level} · λ={t.lam:g}"
    shown = ("transfer.paradigm", "transfer.metric", "transfer.level", "transfer.lam", "transfer.baseline_network")
    rest = [_shown(k, v) for k, v in overrides.items() if k not in shown and v is not None]
    return " · ".join([head, *rest])


def _shown(key: str, value: Any) -> str:
    last = key.rsplit(".", 1)[-1]
    if isinstance(value, dict):  # a whole section: its settings are in the run's params, not its name
        return f"{last}({len(value)} settings)"
    return f"{last}={value}"


def arm(cfg: TrialConfig) -> str:
    """The table row a trial belongs to: its paradigm, or which baseline."""
    t = cfg.transfer
    if t.paradigm_info.cam_network:  # every paradigm but the baselines names its own network
        return t.paradigm
    row = f"{t.paradigm}_{'cnn' if t.cam_network == 'teacher' else 'vit'}"
    return f"{row}+pcm" if cfg.cam_net.pcm else row  # the thesis reports ResNet-50 with and without PCM
