"""A pre-training run on the fractal corpus (`wsss pretrain`): corpus, network, schedule.

The schema only: `training.fractals` renders the corpus and `training.pretrain` trains.
A trial names a pre-training run as ``model.<net>.pretrained: "pretrain:<name>"`` (a file
of ``search_spaces/pretrain/``) or ``"pretrain:path/to/file.yaml"``; `check_pretrain_ref`
checks, at validate time, that the file exists and pre-trains that very network.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config.data import IMAGENET_MEAN, IMAGENET_STD
from training.config.net import NetConfig
from training.config.parse import apply_overrides, from_dict, load_yaml, parse_overrides
from training.errors import ConfigError, did_you_mean

PRETRAIN_PREFIX = "pretrain:"
SHIPPED = Path(__file__).resolve().parents[2] / "search_spaces" / "pretrain"


@dataclass(frozen=True)
class FractalConfig:
    """Parameters of the fractal corpus.

    Attributes:
        classes: K, the number of IFS classes.
        instances: training instances per class.
        val_instances: held-out instances per class (other draws of the same classes).
        size: side S of the square images, px.
        min_maps: fewest affine maps in one system.
        max_maps: most affine maps in one system.
        min_fill: share of the canvas an attractor must cover when drawn to fit it
            (FractalDB's filling-rate filter).
        jitter: relative per-instance perturbation of each map's singular values,
            angles (× π/2) and translation.
        min_scale: smallest instance extent, as a share of the canvas side.
        max_scale: largest instance extent, as a share of the canvas side.
        rotation: largest placement rotation, degrees (uniform in ±rotation).
        points_per_pixel: chaos-game points per canvas pixel.
        seed: makes the whole corpus reproducible.
    """

    classes: int = 100
    instances: int = 40
    val_instances: int = 10
    size: int = 64
    min_maps: int = 2
    max_maps: int = 4
    min_fill: float = 0.12
    jitter: float = 0.1
    min_scale: float = 0.6
    max_scale: float = 1.0
    rotation: float = 180.0
    points_per_pixel: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self, "classes", lo=2, hi=100_000, integer=True)
        _check(self, "instances", lo=1, hi=100_000, integer=True)
        _check(self, "val_instances", lo=0, hi=100_000, integer=True)
        _check(self, "size", lo=16, hi=1024, integer=True)
        _check(self, "min_maps", lo=2, hi=8, integer=True)
        _check(self, "max_maps", lo=self.min_maps, hi=8, integer=True)
        _check(self, "min_fill", lo=0.0, hi=0.9)
        _check(self, "jitter", lo=0.0, hi=0.5)
        _check(self, "min_scale", lo=0.1, hi=1.5)
        _check(self, "max_scale", lo=self.min_scale, hi=1.5)
        _check(self, "rotation", lo=0.0, hi=180.0)
        _check(self, "points_per_pixel", lo=0.5, hi=64.0)
        _check(self, "seed", lo=0, hi=2**63 - 1, integer=True)


def _check(cfg: FractalConfig, name: str, *, lo: float, hi: float, integer: bool = False) -> None:
    value = getattr(cfg, name)
    types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"corpus.{name}: expected {what} in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class PretrainSchedule:
    """How the backbone learns the corpus: AdamW, linear warm-up, cosine decay to 0."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name}: expected ≥ {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.weight_decay/warmup_epochs: expected ≥ 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class PretrainConfig:
    """One pre-training run: the corpus, the network, its input normalisation, the schedule.

    ``mean``/``std`` must equal the trials' ``data.mean``/``data.std``: the backbone
    learns features of inputs normalised this way. ``device`` and ``threads`` only
    say where to run; inside a trial the trial's own settings are used.
    """

    name: str = "pretrain"
    corpus: FractalConfig = field(default_factory=FractalConfig)
    net: NetConfig = field(default_factory=NetConfig)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train: PretrainSchedule = field(default_factory=PretrainSchedule)
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        self.net.check("net")
        if self.net.pretrained != "false":
            raise ConfigError(
                f"net.pretrained: expected false (pre-training starts from scratch), got {self.net.pretrained!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"mean/std: expected 3 values each (R, G, B), std > 0; got {list(self.mean)}, {list(self.std)}"
            )
        if self.threads < 0:
            raise ConfigError(f"threads: expected ≥ 0, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------- configs by name


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def pretrain_config_path(source: str | Path, *, field: str = "pretrain config") -> Path:
    """A shipped config's name (``fractal_vit``) or a YAML file's path → the file.

    Raises:
        ConfigError: naming ``field``, the value, and the valid names.
    """
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or "/" in text:
        if not path.is_file():
            raise ConfigError(f"{field}: pretrain config file {text!r} does not exist")
        return path
    names = shipped_names()
    if text not in names:
        raise ConfigError(
            f"{field}: unknown pretrain config {text!r}{did_you_mean(text, names)}; "
            f"valid: {', '.join(names)} (or a path to a .yaml file)"
        )
    return SHIPPED / f"{text}.yaml"


def load_pretrain_config(
    source: str | Path, overrides: list[str] | dict[str, Any] = (), *, field: str = "pretrain config"
) -> PretrainConfig:
    """Read a pretrain config (name or path), apply ``key=value`` overrides, validate it."""
    path = pretrain_config_path(source, field=field)
    if isinstance(overrides, list | tuple):
        overrides = parse_overrides(list(overrides))
    try:
        return from_dict(PretrainConfig, apply_overrides(load_yaml(path), overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def is_pretrain_ref(value: str) -> bool:
    return value.startswith(PRETRAIN_PREFIX)


def check_pretrain_ref(net: NetConfig, field: str) -> PretrainConfig:
    """The pretrain config ``net.pretrained`` names, checked to pre-train this very network.

    Raises:
        ConfigError: unknown name, bad file, or a config of another network.
    """
    cfg = load_pretrain_config(net.pretrained.removeprefix(PRETRAIN_PREFIX), field=field)
    differ = [k for k in ("name", "output_stride", "options") if getattr(cfg.net, k) != getattr(net, k)]
    if differ:
        raise ConfigError(
            f"{field}: {net.pretrained!r} pre-trains {_describe(cfg.net)}, but this network is "
            f"{_describe(net)} (they differ in {', '.join(differ)}); its weights would not fit"
        )
    return cfg


def _describe(net: NetConfig) -> str:
    return f"{net.name} (output_stride {net.output_stride}, options {net.options})"
