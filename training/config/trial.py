"""The trial config: one frozen dataclass per section, built from YAML.

A trial config is the whole recipe of one run (data, models, transfer loss,
training schedule, CAM extraction). It is built by `load_trial_config` from a
YAML file plus ``key=value`` overrides; unknown keys are rejected with the
nearest valid name, and every value is type- and range-checked against the name
tables of `training.config.names`, so a typo in a search space fails before any
GPU time is spent, and without importing torch or timm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.atomic import atomic_write_text
from training.config import names
from training.config.data import DataConfig
from training.config.net import NetConfig
from training.config.parse import (
    apply_overrides,
    at_least,
    check_tree,
    config_digest,
    dig,
    from_dict,
    load_yaml,
    one_of,
    parse_overrides,
    plain,
    set_dotted,
)
from training.config.pretrain import check_pretrain_ref, is_pretrain_ref
from training.config.scd import SCDConfig
from training.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    teacher: NetConfig = field(default_factory=lambda: NetConfig("resnet50"))
    student: NetConfig = field(default_factory=lambda: NetConfig("vit_base_patch16_224"))
    proj_channels: int = 2  # shared space of the 1×1 projections (the thesis: 2)

    def check(self, path: str) -> None:
        at_least(self.proj_channels, 1, f"{path}.proj_channels")
        for role in ("teacher", "student"):
            net = getattr(self, role)
            if is_pretrain_ref(net.pretrained):  # a pre-training config: must exist and fit this net
                check_pretrain_ref(net, f"{path}.{role}.pretrained")


@dataclass(frozen=True)
class TransferConfig:
    """The knowledge-transfer term ``λ · L_transfer`` and the training paradigm."""

    paradigm: str = "teacher_student"  # a name in names.PARADIGMS
    metric: str = "cosine"  # a name in names.TRANSFER_METRICS
    level: str = "global"  # a name in names.ALIGNMENT_LEVELS (names.INVALID_PAIRS says which pairs fail)
    lam: float = 1.0
    temperature: float = 1.0  # kl only
    baseline_network: str = "student"  # baseline only: "student" (ViT) or "teacher" (CNN)
    teacher_checkpoint: str = ""  # teacher_student: frozen teacher; "" = train one first
    teacher_target: str = "classifier_map"  # a names.TEACHER_TARGETS name: what the student is aligned with
    # teacher_student: ``data`` overrides (keys relative to the data section, e.g. ``synth.chimney_with_smoke``)
    # for the teacher's own training only; {} = the student's data. The student, the teacher feature cache
    # and every metric keep this trial's ``data`` (see `teacher_data_config`).
    teacher_data: dict[str, Any] = field(default_factory=dict)

    @property
    def paradigm_info(self) -> names.ParadigmInfo:
        """What the paradigm needs (a frozen teacher, the feature cache…), from its name table."""
        return names.PARADIGMS.get(self.paradigm, field="transfer.paradigm")

    @property
    def cam_network(self) -> str:
        """``student`` or ``teacher``: the network whose CAMs this trial evaluates."""
        return self.paradigm_info.cam_network or self.baseline_network

    def check(self, path: str) -> None:
        names.PARADIGMS.check(self.paradigm, field=f"{path}.paradigm")
        names.check_pair(self.metric, self.level, path=path)
        if not self.lam >= 0:
            raise ConfigError(f"{path}.lam: expected λ ≥ 0, got {self.lam}")
        if not self.temperature > 0:
            raise ConfigError(f"{path}.temperature: expected > 0, got {self.temperature}")
        one_of(self.baseline_network, names.NETWORKS, f"{path}.baseline_network")
        names.TEACHER_TARGETS.check(self.teacher_target, field=f"{path}.teacher_target")

    @property
    def target_info(self) -> names.TeacherTargetInfo:
        return names.TEACHER_TARGETS.get(self.teacher_target, field="transfer.teacher_target")


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
        at_least(self.epochs, 1, f"{path}.epochs")
        at_least(self.batch_size, 1, f"{path}.batch_size")
        at_least(self.teacher_epochs, 1, f"{path}.teacher_epochs")
        for name in ("lr", "teacher_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{path}.{name}: expected > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"{path}.weight_decay/warmup_epochs: expected ≥ 0")
        at_least(self.threads, 0, f"{path}.threads")
        one_of(self.precision, ("fp32", "bf16"), f"{path}.precision")
        one_of(self.teacher_cache, ("float16", "float32", "false"), f"{path}.teacher_cache")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{path}.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class CamConfig:
    method: str = "weight"  # a name in names.CAM_METHODS
    normalise: str = "minmax"  # a name in names.CAM_NORMALISATIONS, per image and scale (the thesis: minmax)
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    threshold: float = 0.3
    layers: tuple[int, ...] = ()  # blocks to fuse, e.g. (-5, -4, -2, -1); () = last features
    shard_size: int = 64  # images per saved CAM shard
    batch_size: int = 16
    gallery: int = 8  # CAM overlay pictures saved per trial

    def check(self, path: str) -> None:
        names.CAM_METHODS.check(self.method, field=f"{path}.method")
        names.CAM_NORMALISATIONS.check(self.normalise, field=f"{path}.normalise")
        if not self.scales:
            raise ConfigError(f"{path}.scales: expected at least one scale, got []")
        if min(self.scales) <= 0:
            raise ConfigError(f"{path}.scales: expected positive scales, got {list(self.scales)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{path}.threshold: expected a value in (0, 1), got {self.threshold}")
        at_least(self.shard_size, 1, f"{path}.shard_size")
        at_least(self.batch_size, 1, f"{path}.batch_size")
        at_least(self.gallery, 0, f"{path}.gallery")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; written next to every output as ``config.yaml``."""

    name: str = "trial"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    # Self Correspondence Distillation's settings: only for paradigms whose facts say scd, which get the
    # paper's defaults when the section is left out; None (written `scd: null`) for every other paradigm
    scd: SCDConfig | None = None

    def __post_init__(self) -> None:
        check_tree(self)
        if self.scd is None and self.transfer.paradigm_info.scd:
            object.__setattr__(self, "scd", SCDConfig())  # frozen: the resolved config names every setting
        self.check()

    @property
    def cam_net(self) -> NetConfig:
        """The config of the network whose CAMs are evaluated."""
        return getattr(self.model, self.transfer.cam_network)

    def check(self) -> None:
        """Rules across sections, decided from the name tables' facts (nothing is built)."""
        self._check_cam_network()
        self._check_teacher_target()
        self._check_scd()
        self._check_teacher_data()

    def _check_cam_network(self) -> None:
        net, role = self.cam_net, self.transfer.cam_network
        if names.CAM_METHODS.get(self.cam.method).needs_avg_head and net.is_vit and net.head != "avg":
            raise ConfigError(
                f"cam.method: {self.cam.method!r} reads the classifier weights off the patch tokens, which is "
                f"the logit only with an average-pooled head, but model.{role}.head is {net.head!r}; use "
                f"cam.method: gradcam (the thesis's ViT CAM) or model.{role}.head: avg"
            )
        layers = list(self.cam.layers)
        if layers and not names.CAM_METHODS.get(self.cam.method).layer_fusion:
            fusing = ", ".join(m for m in names.CAM_METHODS if names.CAM_METHODS.get(m).layer_fusion)
            raise ConfigError(f"cam.layers: layer fusion is only implemented for method {fusing}; got {layers}")
        if set(layers) - {-1} and not self.cam_net.is_vit:
            raise ConfigError(
                f"cam.layers: layer fusion needs a ViT (equal widths per block); got {layers} with the CNN "
                f"model.{self.transfer.cam_network} ({self.cam_net.name})"
            )

    def _check_teacher_target(self) -> None:
        t = self.transfer
        if not t.paradigm_info.transfer or names.ALIGNMENT_LEVELS.get(t.level).on_logits:
            return
        channels = t.target_info.fixed_channels
        if channels and self.model.proj_channels != channels:
            raise ConfigError(
                f"model.proj_channels: transfer.teacher_target {t.teacher_target!r} has {channels} channels, so "
                f"the student's projection needs {channels}, got {self.model.proj_channels}; set "
                f"model.proj_channels: {channels} or transfer.teacher_target: projection"
            )

    def _check_scd(self) -> None:
        t = self.transfer
        if not t.paradigm_info.scd:
            if self.scd is not None:
                changed = [f.name for f in dataclasses.fields(SCDConfig) if getattr(self.scd, f.name) !=
                           getattr(SCDConfig, f.name)]
                where = f"scd.{changed[0]}" if changed else "scd"
                using = ", ".join(n for n in names.PARADIGMS if names.PARADIGMS.get(n).scd)
                raise ConfigError(
                    f"{where}: SCD settings apply only to transfer.paradigm {using}; this trial's paradigm is "
                    f"{t.paradigm!r}; remove the scd section (or set it to null) or change the paradigm"
                )
            return
        net, role = self.cam_net, t.cam_network
        if net.is_vit and net.head != "avg":
            raise ConfigError(
                f"model.{role}.head: {t.paradigm} needs a backbone whose feature map gives its logit (SCD's CAMs, "
                f"pseudo labels and correspondence target are its classifier applied at every position), but "
                f"{net.name} with head {net.head!r} classifies from its class token; set model.{role}.head: avg"
            )

    def _check_teacher_data(self) -> None:
        t = self.transfer
        if not t.teacher_data:
            return
        if not t.paradigm_info.frozen_teacher:
            frozen = ", ".join(p for p in names.PARADIGMS if names.PARADIGMS.get(p).frozen_teacher)
            raise ConfigError(
                f"transfer.teacher_data: only a paradigm that trains its teacher first ({frozen}) has separate "
                f"teacher data; transfer.paradigm is {t.paradigm!r}; remove the key"
            )
        teacher_data_config(self.data, t.teacher_data)

    @property
    def teacher_train_data(self) -> DataConfig:
        """The data the frozen teacher is trained on: ``data`` with ``transfer.teacher_data`` applied."""
        return teacher_data_config(self.data, self.transfer.teacher_data)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def digest(self, *sections: str) -> str:
        """A short stable hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        return config_digest({s: dig(d, s) for s in sections} if sections else d)

    def replace(self, **overrides: Any) -> TrialConfig:
        """A copy with dotted-key overrides, e.g. ``replace(**{"transfer.lam": 0.5})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return from_dict(TrialConfig, d)


def teacher_data_config(data: DataConfig, overrides: dict[str, Any]) -> DataConfig:
    """``data`` with the teacher's overrides applied, built and checked like the data section.

    Args:
        data: the trial's data section.
        overrides: dotted keys relative to the data section (``{"synth.chimney_with_smoke": 0.5}``);
            nested mappings are merged key by key, so ``{"synth": {"seed": 1}}`` keeps the other
            synth fields.
    Raises:
        ConfigError: an unknown key or a bad value, named ``transfer.teacher_data.<key>``; other
            synthetic data in the one folder ``data.root`` names.
    """
    path = "transfer.teacher_data"
    merged = apply_overrides(plain(dataclasses.asdict(data)), _leaves(overrides))
    try:
        built = from_dict(DataConfig, merged, path)
    except ConfigError as err:  # the synth section checks its values without knowing its path
        msg = str(err)
        raise ConfigError(msg if msg.startswith(path) else f"{path}.{msg}") from None
    check_tree(built, path)
    built.check(path)
    if built.source == "synthetic" and built.synth != data.synth and built.root and built.root == data.root:
        raise ConfigError(
            f"{path}: changes data.synth, but data.root pins the generated dataset to one folder ({data.root}); "
            f"give the teacher its own with {path}.root, or leave data.root empty (the cache keys each dataset)"
        )
    return built


def _leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"synth": {"seed": 1}, "image_size": 64}`` → ``{"synth.seed": 1, "image_size": 64}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _leaves(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


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
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
