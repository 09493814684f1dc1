"""The sweep file: a base trial config, the axes to vary, and how to run and report it.

A sweep file names a ``base`` trial config (a path relative to the sweep file,
or an inline mapping), dotted ``set`` overrides, ``grid`` axes (cartesian
product), ``sample`` axes (drawn ``num_samples`` times with a seeded generator),
``include`` trials added as they are (baselines), per-trial ``resources``, a
``scheduler``, result ``tables`` and a ``refine:`` section (`RefineSection`:
which trials, which refinement pipelines, how many actors). `load_space` reads
and validates all of it; `orchestrator.space.expand` turns it into trials.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from training.config import names
from training.config.parse import apply_overrides, check_int, from_dict, load_yaml, parse_overrides
from training.config.refine import parse_pipeline, pipeline_key
from training.config.search import SearchSpec, check_metric
from training.config.trial import TrialConfig
from training.errors import ConfigError, did_you_mean

SECTIONS = (
    "name", "description", "base", "set", "grid", "sample", "num_samples", "sample_seed", "include",
    "resources", "max_concurrent", "max_failures", "scheduler", "search", "tables", "refine",
)  # fmt: skip
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BOUNDED_SAMPLERS = ("uniform", "loguniform", "randint")  # take [low, high]


@dataclass(frozen=True)
class Resources:
    """Per-trial resources; fractional GPUs (≤ 1) pack small trials on one GPU.

    ``wait_for_node_s``: how long a sweep waits when no live node can hold a
    trial any more (the only node big enough was lost) before it stops, its
    state saved, to be resumed with the same command.
    """

    cpu: float = 1.0
    gpu: float = 0.0
    wait_for_node_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.cpu > 0:
            raise ConfigError(f"resources.cpu: expected > 0, got {self.cpu}")
        if not self.wait_for_node_s >= 0:
            raise ConfigError(f"resources.wait_for_node_s: expected seconds ≥ 0, got {self.wait_for_node_s}")
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

    type: str = "none"  # a name in names.SCHEDULERS
    metric: str = "val_miou_1x"  # a per-epoch metric (search.EPOCH_METRICS); test_* only without a validation split
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        names.SCHEDULERS.check(self.type, field="scheduler.type")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"scheduler.mode: expected max or min, got {self.mode!r}")


@dataclass(frozen=True)
class TableSpec:
    """One pivot table: row fields × column fields → mean of ``value``.

    Attributes:
        name: file name stem (``tables/<name>.md``); letters, digits, ``_.-``.
        rows: result keys whose values label the rows (e.g. ``("transfer.paradigm",)``).
        columns: result keys whose values label the columns (joined by spaces).
        value: the result key averaged in each cell.
        fmt: format of a cell after scaling.
        scale: multiplier applied before formatting (100 → percent, as in the thesis).
    """

    name: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    value: str = "miou"
    fmt: str = "{:.2f}"
    scale: float = 100.0

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise ConfigError(f"table name {self.name!r}; expected letters, digits, '_', '.', '-'")
        if not self.rows or not self.columns:
            raise ConfigError(f"table {self.name!r}: rows and columns must each name at least one key")
        try:
            self.fmt.format(1.0)
        except (ValueError, IndexError, KeyError) as err:
            raise ConfigError(f"table {self.name!r}: fmt {self.fmt!r} cannot format a number ({err})") from err

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSpec:
        """Build from YAML; ``rows``/``columns`` may be one string or a list.

        Raises:
            ConfigError: unknown or missing keys.
        """
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                hint = did_you_mean(key, known)
                raise ConfigError(f"table spec: unknown key {key!r}{hint}; expected one of {', '.join(sorted(known))}")
        missing = [k for k in ("name", "rows", "columns") if k not in d]
        if missing:
            raise ConfigError(f"table spec {d.get('name', '?')!r}: missing key(s) {', '.join(missing)}")
        values = dict(d)
        for key in ("rows", "columns"):
            raw = values[key]
            values[key] = (raw,) if isinstance(raw, str) else tuple(raw)
        values["scale"] = float(values.get("scale", cls.scale))
        return cls(**values)


# ---------------------------------------------------------------- the sweep file's refine: section


def best_k(spec: Any) -> int | None:
    """K of a ``best:K`` trial selection; None for any other spec.

    Raises:
        ConfigError: ``best:`` followed by anything but an integer ≥ 1.
    """
    if not (isinstance(spec, str) and spec.strip().startswith("best:")):
        return None
    k = spec.strip()[len("best:") :]
    if not k.isdigit() or int(k) < 1:
        raise ConfigError(f"refine.trials: {spec!r}; expected best:K with an integer K ≥ 1, all, or trial ids")
    return int(k)


@dataclass(frozen=True)
class RefineSection:
    """The ``refine:`` section of a sweep file, its pipelines expanded.

    Attributes:
        pipelines: the concrete pipeline specs (``{grid: [...]}`` expanded,
            duplicates by key dropped), each a list of ``{"step": name, **fields}``.
        trials: ``best:K``, ``all``, ``id,id`` or a list of trial ids.
        rank_by: the result key ``best:K`` ranks by (``val_miou`` to choose on the validation
            split, as settings must be; default ``miou``).
        cpu_actors: actors for CRF / superpixel units; 0 = one per CPU of the cluster.
        gpu_actors: actors for SAM units (one GPU each).
        max_retries: times a unit is requeued after its actor died.
        raw: the section as written (a finished refinement is recognised by it).
    """

    pipelines: tuple[list[dict[str, Any]], ...]
    trials: str | tuple[str, ...] = "all"
    rank_by: str = "miou"
    cpu_actors: int = 0
    gpu_actors: int = 0
    max_retries: int = 2
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, section: Any) -> RefineSection:
        """Validate a ``refine:`` mapping; see :func:`expand_refine_grid` for ``pipelines``.

        Raises:
            ConfigError: naming ``refine.<key>`` (and for pipelines the grid choice,
                the step and the field).
        """
        pipelines = expand_refine_grid(section)
        trials = section.get("trials", cls.trials)
        if isinstance(trials, list) and all(isinstance(t, str) for t in trials):
            trials = tuple(trials)
        elif not isinstance(trials, str):
            raise ConfigError(f"refine.trials: expected best:K, all, or trial ids, got {trials!r}")
        best_k(trials)
        rank_by = section.get("rank_by", cls.rank_by)
        if not isinstance(rank_by, str) or not rank_by:
            raise ConfigError(f"refine.rank_by: expected a result key such as miou or val_miou, got {rank_by!r}")
        counts = {k: section.get(k, getattr(cls, k)) for k in ("cpu_actors", "gpu_actors", "max_retries")}
        counts["cpu_actors"] = counts["cpu_actors"] or 0  # `cpu_actors:` left empty means all CPUs too
        for key, value in counts.items():
            check_int(f"refine.{key}", value, low=0)
        return cls(tuple(pipelines), trials, rank_by, **counts, raw=dict(section))


REFINE_KEYS = tuple(f.name for f in dataclasses.fields(RefineSection) if f.name != "raw")


def _variants(value: Any, where: str) -> list[tuple[Any, dict[str, Any]]]:
    """Every concrete value of ``value`` with ``{grid: [...]}`` expanded, with the choices made."""
    if isinstance(value, Mapping) and set(value) == {"grid"}:
        choices = value["grid"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: expected {{grid: [value, ...]}} with at least one value, got {value!r}")
        return [(choice, {where: choice}) for choice in choices]
    if isinstance(value, Mapping):
        keys = list(value)
        parts = [[(value[k], {})] if k == "step" else _variants(value[k], f"{where}.{k}") for k in keys]
    elif isinstance(value, list):
        keys = list(range(len(value)))
        parts = [_variants(v, f"{where}[{k}]") for k, v in enumerate(value)]
    else:
        return [(value, {})]
    out = []
    for combo in itertools.product(*parts):
        chosen = {path: v for _, made in combo for path, v in made.items()}
        items = [v for v, _ in combo]
        out.append((dict(zip(keys, items, strict=True)) if isinstance(value, Mapping) else items, chosen))
    return out


def expand_refine_grid(section: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """The concrete pipeline specs of a ``refine:`` section, ``{grid: [...]}`` values expanded.

    Each entry of ``pipelines`` gives the cartesian product of its grids (any
    field of a step may be a grid, also inside ``proposal_params``; the step
    name may not); the specs are validated and duplicates (same key) dropped.
    Nothing is built: a SAM pipeline is checked without loading SAM.

    Raises:
        ConfigError: unknown section key, malformed grid, or an invalid pipeline
            (the message names ``refine.pipelines[i]``, the grid choices, the step
            and the field).
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"refine: expected a mapping with keys {', '.join(REFINE_KEYS)}, got {section!r}")
    unknown = sorted(map(str, set(section) - set(REFINE_KEYS)))
    if unknown:
        hint = did_you_mean(unknown[0], REFINE_KEYS) if len(unknown) == 1 else ""
        raise ConfigError(f"refine: unknown key(s) {', '.join(unknown)}; valid: {', '.join(REFINE_KEYS)}{hint}")
    entries = section.get("pipelines")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"refine.pipelines: expected a non-empty list of pipelines (lists of steps), got {entries!r}")
    specs: dict[str, list[dict[str, Any]]] = {}
    for index, entry in enumerate(entries):
        where = f"refine.pipelines[{index}]"
        if not isinstance(entry, list):
            raise ConfigError(f"{where}: expected a list of steps like [{{step: crf, scale: 12}}], got {entry!r}")
        for spec, chosen in _variants(entry, where):
            try:
                parse_pipeline(spec)
            except ConfigError as err:
                made = ", ".join(f"{p[len(where):]}={v!r}" for p, v in chosen.items())
                raise ConfigError(f"{where}" + (f" (grid choice {made})" if made else "") + f": {err}") from err
            specs.setdefault(pipeline_key(spec), spec)
    return list(specs.values())


@dataclass(frozen=True)
class SearchSpace:
    """A validated sweep file (``base`` resolved to a plain trial-config mapping)."""

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
    search: SearchSpec | None = None  # suggest trials over `sample` instead of drawing them
    tables: tuple[TableSpec, ...] = ()
    refine: RefineSection | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the file as written, for MLflow
    warnings: tuple[str, ...] = ()  # what `wsss validate` and `wsss sweep` print before anything runs


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
    base_cfg = from_dict(TrialConfig, base)  # fail early on a bad base, before expanding
    grid = _mapping(raw, "grid")
    for key, values in grid.items():
        _check_axis(key, values)
    sample = _mapping(raw, "sample")
    for key, spec in sample.items():
        _check_sampler(key, spec)
    include = raw.get("include") or []
    if not isinstance(include, list) or not all(isinstance(i, dict) for i in include):
        raise ConfigError("include: expected a list of mappings of dotted overrides")
    scheduler = from_dict(SchedulerSpec, raw.get("scheduler"), "scheduler")
    search = SearchSpec.from_dict(raw["search"]) if raw.get("search") is not None else None
    warnings = _check_metrics(raw, search, sample, scheduler, base_cfg.data.val_fraction)
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
        scheduler=scheduler,
        search=search,
        tables=tuple(TableSpec.from_dict(t) for t in raw.get("tables") or []),
        refine=RefineSection.from_dict(raw["refine"]) if raw.get("refine") else None,
        raw=raw,
        warnings=warnings,
    )


def _check_metrics(
    raw: dict[str, Any],
    search: SearchSpec | None,
    sample: dict[str, Any],
    scheduler: SchedulerSpec,
    val_fraction: float,
) -> tuple[str, ...]:
    """What a search and an ASHA scheduler read must be reported, and not chosen on the test set.

    Returns:
        The warnings to print (a test metric where no validation split exists).
    """
    said = []
    if scheduler.type == "asha":
        said.append(check_metric(scheduler.metric, field="scheduler.metric", val_fraction=val_fraction, per_epoch=True))
    if search is not None:
        if not sample:
            raise ConfigError(
                "search: nothing to search; `sample:` names no distribution to suggest from, "
                "e.g. sample: {transfer.lam: {loguniform: [0.3, 1.5]}}"
            )
        for key in ("num_samples", "sample_seed"):
            if key in raw:
                raise ConfigError(
                    f"{key}: not used with search: (the budget is search.num_trials, its seed search.seed)"
                )
        for key, spec in sample.items():
            for value in spec.get("choice", []):
                if not (value is None or isinstance(value, str | int | float | bool)):
                    raise ConfigError(
                        f"sample.{key}.choice: with search:, each choice must be one value (text, number, "
                        f"true/false or null), got {value!r}"
                    )
        said.append(check_metric(search.metric, field="search.metric", val_fraction=val_fraction, per_epoch=False))
    return tuple(w for w in said if w)


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


def _check_sampler(key: str, spec: Any) -> None:
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"sample.{key}: expected one sampler, e.g. {{loguniform: [0.1, 2.0]}}, got {spec!r}")
    ((name, args),) = spec.items()
    names.SAMPLERS.check(name, field=f"sample.{key}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"sample.{key}.{name}: expected a list of arguments, got {args!r}")
    if name in _BOUNDED_SAMPLERS:
        if len(args) != 2 or not args[0] < args[1]:
            raise ConfigError(f"sample.{key}.{name}: expected [low, high] with low < high, got {args}")
        if name == "loguniform" and args[0] <= 0:
            raise ConfigError(f"sample.{key}.loguniform: expected low > 0, got {args[0]}")


def _positive_int(value: Any, name: str, *, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}: expected an integer ≥ {low}, got {value!r}")
    return value
