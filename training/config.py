"""The trial config: one frozen dataclass per section, built from YAML.

A trial config is the whole recipe of one run (data, models, transfer loss,
training schedule, CAM extraction). It is built by `load_trial_config` from a
YAML file plus ``key=value`` overrides; unknown keys are rejected with the
nearest valid name, and every value is type- and range-checked, so a typo in a
search space fails before any GPU time is spent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import ConfigError, did_you_mean
from training.synth import SynthConfig

_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are fed to the networks."""

    source: str = "synthetic"  # "synthetic" (generated, cached) or "folder"
    root: str = ""  # folder with train/ and test/; for synthetic: the cache folder
    synth: SynthConfig = field(default_factory=SynthConfig)
    image_size: int = 96  # training/eval input side, px (the thesis: 512)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: bool = False  # horizontal flips; disables the teacher feature cache
    num_workers: int = 0

    def check(self, path: str) -> None:
        _one_of(self.source, ("synthetic", "folder"), f"{path}.source")
        if self.source == "folder" and not self.root:
            raise ConfigError(f"{path}.root: expected a dataset folder when source is 'folder'")
        _at_least(self.image_size, 16, f"{path}.image_size")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{path}.{name}: expected 3 values (R, G, B)")
        if min(self.std) <= 0:
            raise ConfigError(f"{path}.std: expected positive values, got {list(self.std)}")
        _at_least(self.num_workers, 0, f"{path}.num_workers")


@dataclass(frozen=True)
class NetConfig:
    """One backbone, created by name through ``timm.create_model``."""

    name: str = "resnet50"
    pretrained: str = "false"  # "false", "true" (timm's own loading), a local checkpoint path, or "pretrain:<config>"
    output_stride: int = 16  # CNNs only: 8, 16 or 32
    pcm: bool = False  # CNNs only: refine CAMs with the pixel correlation module
    options: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs

    def check(self, path: str) -> None:
        if not self.name:
            raise ConfigError(f"{path}.name: expected a timm model name")
        _one_of(self.output_stride, (8, 16, 32), f"{path}.output_stride")
        if self.pretrained.startswith("pretrain:"):  # a pre-training config: must exist and fit this net
            from training.pretrain import check_pretrain_ref

            check_pretrain_ref(self, f"{path}.pretrained")


@dataclass(frozen=True)
class ModelConfig:
    teacher: NetConfig = field(default_factory=lambda: NetConfig("resnet50"))
    student: NetConfig = field(default_factory=lambda: NetConfig("vit_base_patch16_224"))
    proj_channels: int = 2  # shared space of the 1×1 projections (the thesis: 2)

    def check(self, path: str) -> None:
        _at_least(self.proj_channels, 1, f"{path}.proj_channels")


@dataclass(frozen=True)
class TransferConfig:
    """The knowledge-transfer term ``λ · L_transfer`` and the training paradigm."""

    paradigm: str = "teacher_student"  # baseline | teacher_student | co_training
    metric: str = "cosine"  # cosine | l1 | l2 | kl
    level: str = "global"  # global | spatial | channel | spatial_map | gram | logits
    lam: float = 1.0
    temperature: float = 1.0  # kl only
    baseline_network: str = "student"  # baseline only: "student" (ViT) or "teacher" (CNN)
    teacher_checkpoint: str = ""  # teacher_student: frozen teacher; "" = train one first

    def check(self, path: str) -> None:
        from training.losses import check_pair
        from training.paradigms import PARADIGMS

        PARADIGMS.check(self.paradigm, field=f"{path}.paradigm")
        try:
            check_pair(self.metric, self.level)
        except ConfigError as err:
            raise ConfigError(f"{path}.metric/{path}.level: {err}") from None
        if not self.lam >= 0:
            raise ConfigError(f"{path}.lam: expected λ ≥ 0, got {self.lam}")
        if not self.temperature > 0:
            raise ConfigError(f"{path}.temperature: expected > 0, got {self.temperature}")
        _one_of(self.baseline_network, ("student", "teacher"), f"{path}.baseline_network")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to 0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA or CPU)
    channels_last: bool = False  # memory format for the CNN (faster on GPUs)
    teacher_cache: str = "float16"  # teacher_student: cached teacher features: float16 | float32 | false
    teacher_epochs: int = 3  # teacher_student: epochs of the teacher trained first
    teacher_lr: float = 1e-4

    def check(self, path: str) -> None:
        _at_least(self.epochs, 1, f"{path}.epochs")
        _at_least(self.batch_size, 1, f"{path}.batch_size")
        _at_least(self.teacher_epochs, 1, f"{path}.teacher_epochs")
        for name in ("lr", "teacher_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{path}.{name}: expected > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"{path}.weight_decay/warmup_epochs: expected ≥ 0")
        _at_least(self.threads, 0, f"{path}.threads")
        _one_of(self.precision, ("fp32", "bf16"), f"{path}.precision")
        _one_of(self.teacher_cache, ("float16", "float32", "false"), f"{path}.teacher_cache")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{path}.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class CamConfig:
    method: str = "weight"  # weight (classifier-weight CAM) | gradcam
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    threshold: float = 0.3
    layers: tuple[int, ...] = ()  # blocks to fuse, e.g. (-5, -4, -2, -1); () = last features
    shard_size: int = 64  # images per saved CAM shard
    batch_size: int = 16
    gallery: int = 8  # CAM overlay pictures saved per trial

    def check(self, path: str) -> None:
        from training.cams import CAM_METHODS

        CAM_METHODS.check(self.method, field=f"{path}.method")
        if not self.scales:
            raise ConfigError(f"{path}.scales: expected at least one scale, got []")
        if min(self.scales) <= 0:
            raise ConfigError(f"{path}.scales: expected positive scales, got {list(self.scales)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{path}.threshold: expected a value in (0, 1), got {self.threshold}")
        _at_least(self.shard_size, 1, f"{path}.shard_size")
        _at_least(self.batch_size, 1, f"{path}.batch_size")
        _at_least(self.gallery, 0, f"{path}.gallery")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; written next to every output as ``config.yaml``."""

    name: str = "trial"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)

    def __post_init__(self) -> None:
        _check_tree(self, "")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def digest(self, *sections: str) -> str:
        """A short stable hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        return config_digest({s: _dig(d, s) for s in sections} if sections else d)

    def replace(self, **overrides: Any) -> TrialConfig:
        """A copy with dotted-key overrides, e.g. ``replace(**{"transfer.lam": 0.5})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return from_dict(TrialConfig, d)


def config_digest(data: dict[str, Any]) -> str:
    """A short stable hash of plain config data (cache keys for data and teachers)."""
    return hashlib.sha256(json.dumps(_plain(data), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- building


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"{where}: unknown key{did_you_mean(key, names)}; valid keys: {', '.join(names)}"
            )
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a bug in a dataclass, not user input
        raise ConfigError(f"{path or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]  # a single scale is a one-element list
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `1e-4` (no dot) as a string
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, bool):  # YAML turns `pretrained: false` into a bool
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _check_tree(node: Any, path: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            sub = f"{path}.{f.name}" if path else f.name
            _check_tree(value, sub)
            check = getattr(value, "check", None)
            if check is not None:
                check(sub)


# ---------------------------------------------------------------- YAML + overrides


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with the safe loader; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["transfer.lam=0.5", "cam.scales=[1.0]"]`` into a dotted-key mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. transfer.lam=0.5")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: cannot parse the value {raw!r}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides set."""
    data = json.loads(json.dumps(data or {}))
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return data


def load_trial_config(path: Path, overrides: list[str] | dict[str, Any] = ()) -> TrialConfig:
    """Read a trial YAML, apply ``key=value`` overrides, build and validate it."""
    data = load_yaml(path)
    if isinstance(overrides, list | tuple):
        overrides = parse_overrides(list(overrides))
    try:
        return from_dict(TrialConfig, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: TrialConfig, path: Path) -> None:
    """Write the resolved config as YAML (the file `wsss trial` can read back)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- small helpers


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _dig(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _plain(value: Any) -> Any:
    """Tuples → lists so the dict round-trips through YAML and JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _one_of(value: Any, valid: tuple, path: str) -> None:
    if value not in valid:
        raise ConfigError(
            f"{path}: expected one of {', '.join(map(str, valid))}, got {value!r}"
            f"{did_you_mean(str(value), map(str, valid))}"
        )


def _at_least(value: int, low: int, path: str) -> None:
    if value < low:
        raise ConfigError(f"{path}: expected ≥ {low}, got {value}")
