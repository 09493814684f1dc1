"""Search spaces: a sweep YAML → a validated, deterministic list of trials.

A sweep file names a ``base`` trial config (a path relative to the sweep file,
or an inline mapping), dotted ``set`` overrides, ``grid`` axes (cartesian
product), ``sample`` axes (drawn ``num_samples`` times with a seeded generator),
and ``include`` trials added as they are (baselines). Expansion happens here,
not in Ray, so ``wsss validate`` knows the exact trials, their ids are stable
across restores, and a sweep's trial can be rebuilt anywhere from its id.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.tables import TableSpec
from training.config import TrialConfig, apply_overrides, from_dict, load_yaml, parse_overrides
from training.errors import CheckpointError, ConfigError, did_you_mean
from training.registry import Registry

SAMPLERS: Registry = Registry("sampler")
SECTIONS = (
    "name", "description", "base", "set", "grid", "sample", "num_samples", "sample_seed", "include",
    "resources", "max_concurrent", "max_failures", "scheduler", "tables", "refine",
)  # fmt: skip


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
class Resources:
    """Per-trial resources; fractional GPUs (≤ 1) pack small trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpu > 0:
            raise ConfigError(f"resources.cpu: expected > 0, got {self.cpu}")
        if self.gpu < 0:
            raise ConfigError(f"resources.gpu: expected ≥ 0, got {self.gpu}")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ConfigError(
                f"resources.gpu: a fraction is only allowed below 1 (to pack trials on one GPU); got {self.gpu}"
            )

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping; ``none`` runs every trial to the end."""

    type: str = "none"  # none | asha
    metric: str = "test_miou_1x"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.type not in ("none", "asha"):
            raise ConfigError(f"scheduler.type: expected none or asha, got {self.type!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"scheduler.mode: expected max or min, got {self.mode!r}")


@dataclass(frozen=True)
class TrialSpec:
    """One expanded trial: a stable id, its overrides and its resolved config."""

    id: str
    overrides: dict[str, Any]
    config: TrialConfig

    @property
    def run_name(self) -> str:
        return run_name(self.config, self.overrides)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: Path
    base: dict[str, Any]
    description: str = ""
    grid: dict[str, list] = field(default_factory=dict)
    sample: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 1
    sample_seed: int = 0
    include: tuple[dict[str, Any], ...] = ()
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 0  # 0 = as many as resources allow
    max_failures: int = 2
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    tables: tuple[TableSpec, ...] = ()
    refine: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the file as written, for MLflow


def load_space(path: Path, overrides: list[str] | None = None) -> SearchSpace:
    """Read and validate a sweep file; ``overrides`` (``key=value``) apply to the base."""
    path = Path(path).resolve()
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a `base` trial config")
    try:
        return _build(raw, path, parse_overrides(overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _build(raw: dict[str, Any], path: Path, extra: dict[str, Any]) -> SearchSpace:
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section{did_you_mean(key, SECTIONS)}; valid: {', '.join(SECTIONS)}")
    base = apply_overrides(apply_overrides(_base(raw.get("base"), path), _mapping(raw, "set")), extra)
    from_dict(TrialConfig, base)  # fail early on a bad base, before expanding
    grid = _mapping(raw, "grid")
    for key, values in grid.items():
        _check_axis(key, values)
    sample = _mapping(raw, "sample")
    for key, spec in sample.items():
        _check_sampler(key, spec)
    include = raw.get("include") or []
    if not isinstance(include, list) or not all(isinstance(i, dict) for i in include):
        raise ConfigError("include: expected a list of mappings of dotted overrides")
    return SearchSpace(
        name=str(raw.get("name") or path.stem),
        source=path,
        base=base,
        description=str(raw.get("description") or ""),
        grid=grid,
        sample=sample,
        num_samples=_positive_int(raw.get("num_samples", 1), "num_samples"),
        sample_seed=int(raw.get("sample_seed", 0)),
        include=tuple(include),
        resources=from_dict(Resources, raw.get("resources"), "resources"),
        max_concurrent=_positive_int(raw.get("max_concurrent", 0), "max_concurrent", low=0),
        max_failures=_positive_int(raw.get("max_failures", 2), "max_failures", low=0),
        scheduler=from_dict(SchedulerSpec, raw.get("scheduler"), "scheduler"),
        tables=tuple(TableSpec.from_dict(t) for t in raw.get("tables") or []),
        refine=raw.get("refine"),
        raw=raw,
    )


def _base(value: Any, path: Path) -> dict[str, Any]:
    if isinstance(value, str):
        base_path = (path.parent / value).resolve()
        try:
            return load_yaml(base_path) or {}
        except ConfigError as err:
            raise ConfigError(f"base: {err}") from None
    if isinstance(value, dict):
        return value
    raise ConfigError(f"base: expected a trial YAML path (relative to the sweep file) or a mapping, got {value!r}")


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of dotted keys, got {value!r}")
    return value


def _check_axis(key: str, values: Any) -> None:
    """A grid axis: a list of values, or for a zipped axis ``"a.b,c.d"`` a list of
    equally long lists (e.g. the thesis's metric × level pairs)."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    width = len(key.split(","))
    if width > 1:
        for v in values:
            if not isinstance(v, list) or len(v) != width:
                raise ConfigError(f"grid.{key}: expected each value to be a list of {width} items, got {v!r}")


def _axis_points(key: str, value: Any) -> dict[str, Any]:
    keys = key.split(",")
    return dict(zip(keys, value, strict=True)) if len(keys) > 1 else {key: value}


def _check_sampler(key: str, spec: Any) -> None:
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"sample.{key}: expected one sampler, e.g. {{loguniform: [0.1, 2.0]}}, got {spec!r}")
    ((name, args),) = spec.items()
    SAMPLERS.check(name, field=f"sample.{key}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"sample.{key}.{name}: expected a list of arguments, got {args!r}")
    if name in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not args[0] < args[1]:
            raise ConfigError(f"sample.{key}.{name}: expected [low, high] with low < high, got {args}")
        if name == "loguniform" and args[0] <= 0:
            raise ConfigError(f"sample.{key}.loguniform: expected low > 0, got {args[0]}")


def _positive_int(value: Any, name: str, *, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}: expected an integer ≥ {low}, got {value!r}")
    return value


# ---------------------------------------------------------------- expansion


def expand(space: SearchSpace) -> list[TrialSpec]:
    """Every trial of the space, in a stable order, duplicates removed.

    Raises:
        ConfigError: naming the trial's overrides when one resolves to a bad config.
    """
    rng = np.random.default_rng(space.sample_seed)
    keys = list(space.grid)
    points: list[dict[str, Any]] = []
    for values in itertools.product(*(space.grid[k] for k in keys)):
        for _ in range(space.num_samples):
            drawn = {
                k: SAMPLERS.get(name)(rng, args) for k, spec in space.sample.items() for name, args in spec.items()
            }
            fixed = {k: v for key, value in zip(keys, values, strict=True) for k, v in _axis_points(key, value).items()}
            points.append(fixed | drawn)
    points.extend(dict(i) for i in space.include)
    return _resolve(space, points)


def _resolve(space: SearchSpace, points: list[dict[str, Any]]) -> list[TrialSpec]:
    threads = max(1, int(space.resources.cpu))  # one intra-op thread per CPU a trial owns
    trials, seen = [], set()
    for overrides in points:
        data = apply_overrides(space.base, overrides)
        train = data.setdefault("train", {})
        if not train.get("threads"):
            train["threads"] = threads
        try:
            cfg = from_dict(TrialConfig, data)
        except ConfigError as err:
            raise ConfigError(f"{space.source}: trial with {overrides}: {err}") from None
        if cfg.digest() in seen:
            continue
        seen.add(cfg.digest())
        trials.append(TrialSpec(f"{len(trials):03d}-{_tag(overrides)}", overrides, cfg))
    return trials


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
    # `pretrain:` references are checked when the config is built, and trained on first use
    paths = [(k, v) for k, v in paths if v.lower() not in ("true", "false") and not v.startswith("pretrain:")]
    if cfg.transfer.teacher_checkpoint:
        paths.append(("transfer.teacher_checkpoint", cfg.transfer.teacher_checkpoint))
    return paths


def _tag(overrides: dict[str, Any]) -> str:
    """A readable id suffix from the override values, e.g. ``co_training-l1-lam0.5``."""
    parts = []
    for key, value in overrides.items():
        last = key.rsplit(".", 1)[-1]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{last}{text}" if isinstance(value, int | float) and not isinstance(value, bool) else text)
    tag = "-".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)[:80]


def run_name(cfg: TrialConfig, overrides: dict[str, Any]) -> str:
    """What the MLflow UI shows: paradigm · metric · level · λ (plus other varied keys)."""
    t = cfg.transfer
    if t.paradigm == "baseline":
        net = getattr(cfg.model, t.baseline_network).name
        head = f"baseline · {'CNN' if t.baseline_network == 'teacher' else 'ViT'} ({net})"
    else:
        head = f"{t.paradigm} · {t.metric} · {t.level} · λ={t.lam:g}"
    shown = ("transfer.paradigm", "transfer.metric", "transfer.level", "transfer.lam", "transfer.baseline_network")
    rest = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items() if k not in shown]
    return " · ".join([head, *rest])


def arm(cfg: TrialConfig) -> str:
    """The table row a trial belongs to: its paradigm, or which baseline."""
    t = cfg.transfer
    if t.paradigm != "baseline":
        return t.paradigm
    return f"baseline_{'cnn' if t.baseline_network == 'teacher' else 'vit'}"
