"""Knowledge-transfer losses between a student and a teacher (or a co-training peer).

A loss is chosen by two names from the search space: an *alignment level*, which
turns a feature map into paired "units" ``B×N×D`` (N units per sample, each a
D-vector), and a *metric*, which turns each pair of units into one number. The
loss is that number averaged over units and batch::

    transfer_loss(student, teacher, metric="cosine", level="global")

Inputs are the projected feature maps ``B×C×H×W`` (same C; the learnable 1×1
projections live with the models), or ``B×K`` logits for level ``logits``. When
the spatial sizes differ the teacher map is resized to the student's.

The loss is differentiable w.r.t. both inputs, because co-training updates both
networks; teacher-student callers detach the teacher themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from training.errors import ConfigError
from training.registry import Registry

UnitsFn = Callable[[Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor, float], Tensor]

METRICS: Registry[MetricFn] = Registry("transfer metric")
LEVELS: Registry[UnitsFn] = Registry("alignment level")

COSINE_EPS = 1e-8

# Pairs that run but measure nothing useful; the value says why, for the error.
_INVALID_PAIRS: dict[tuple[str, str], str] = {
    ("cosine", "logits"): (
        "the cosine of two 1-element logit vectors is only their sign agreement "
        "(±1); use metric=kl, l1 or l2 for level=logits"
    ),
    **{
        (metric, level): (
            f"an elementwise mean over level={level} units is the same number as "
            f"at level=global, which only regroups the same elements; use level=global"
        )
        for metric in ("l1", "l2")
        for level in ("spatial", "channel")
    },
}


# --------------------------------------------------------------------------- levels


@LEVELS.register("global")
def global_units(features: Tensor) -> Tensor:
    """Each sample's whole map as one unit.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×1×(C·H·W)``.
    """
    return features.flatten(1).unsqueeze(1)


@LEVELS.register("spatial")
def spatial_units(features: Tensor) -> Tensor:
    """The channel vector at every position.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×(H·W)×C``, positions in row-major order.
    """
    return features.flatten(2).transpose(1, 2)


@LEVELS.register("channel")
def channel_units(features: Tensor) -> Tensor:
    """Each channel's flattened spatial map.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×C×(H·W)``.
    """
    return features.flatten(2)


@LEVELS.register("spatial_map")
def spatial_map_units(features: Tensor) -> Tensor:
    """The channel-mean map of each sample as one unit.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×1×(H·W)``.
    """
    return features.mean(dim=1).flatten(1).unsqueeze(1)


@LEVELS.register("gram")
def gram_units(features: Tensor) -> Tensor:
    """The channel correlation matrix ``G = F·Fᵀ / (H·W)`` as one unit.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×1×(C·C)``, G flattened row-major.
    """
    flat = features.flatten(2)
    gram = flat @ flat.transpose(1, 2) / flat.shape[-1]
    return gram.flatten(1).unsqueeze(1)


@LEVELS.register("logits")
def logit_units(logits: Tensor) -> Tensor:
    """The logit vector of each sample as one unit.

    Args:
        logits: ``B×K``.

    Returns:
        ``B×1×K``.
    """
    return logits.unsqueeze(1)


# -------------------------------------------------------------------------- metrics


@METRICS.register("cosine")
def cosine_distance(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``1 − cos(s, t)`` per unit pair; ``temperature`` is unused.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.

    Returns:
        ``B×N`` in [0, 2].
    """
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=COSINE_EPS)


@METRICS.register("l1")
def l1_distance(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean absolute difference over D per unit pair; ``temperature`` is unused.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.

    Returns:
        ``B×N``.
    """
    return (student - teacher).abs().mean(dim=-1)


@METRICS.register("l2")
def l2_distance(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared difference over D per unit pair; ``temperature`` is unused.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.

    Returns:
        ``B×N``.
    """
    return (student - teacher).pow(2).mean(dim=-1)


@METRICS.register("kl")
def kl_divergence(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over D per unit pair.

    A one-element unit (D=1, e.g. the single sigmoid logit of smoke/no smoke)
    is read as the Bernoulli distribution ``[1 − σ(x/T), σ(x/T)]``: a softmax
    over one element is constant, which would make the loss identically zero.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.
        temperature: softening temperature T > 0.

    Returns:
        ``B×N``, ≥ 0.
    """
    if student.shape[-1] == 1:
        # softmax([0, x]) == [1 − σ(x), σ(x)]
        student, teacher = _with_zero_logit(student), _with_zero_logit(teacher)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
    return kl.sum(dim=-1) * temperature**2


def _with_zero_logit(units: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(units), units], dim=-1)


# ------------------------------------------------------------------------ the loss


def check_pair(metric: str, level: str) -> None:
    """Raise ConfigError unless ``metric`` × ``level`` is a meaningful combination.

    Args:
        metric: a name in ``METRICS``.
        level: a name in ``LEVELS``.

    Raises:
        ConfigError: an unknown name (listing the valid ones) or an invalid pair
            (saying why it is invalid).
    """
    METRICS.check(metric, field="metric")
    LEVELS.check(level, field="level")
    reason = _INVALID_PAIRS.get((metric, level))
    if reason is not None:
        raise ConfigError(f"metric={metric} with level={level} is not allowed: {reason}")


def valid_pairs() -> list[tuple[str, str]]:
    """Every allowed ``(metric, level)`` pair, sorted by metric then level."""
    return [
        pair
        for pair in itertools.product(METRICS.names(), LEVELS.names())
        if pair not in _INVALID_PAIRS
    ]


def transfer_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    metric: str,
    level: str,
    temperature: float = 1.0,
) -> Tensor:
    """Knowledge-transfer loss between student and teacher features or logits.

    Args:
        student: ``B×C×H×W`` projected features, or ``B×K`` logits for level ``logits``.
        teacher: ``B×C×H'×W'`` (resized bilinearly to H×W when the sizes
            differ), or ``B×K`` logits.
        metric: a name in ``METRICS`` (``cosine``, ``l1``, ``l2``, ``kl``).
        level: a name in ``LEVELS`` (``global``, ``spatial``, ``channel``,
            ``spatial_map``, ``gram``, ``logits``).
        temperature: T for metric ``kl`` (loss scaled by T²); > 0.

    Returns:
        A scalar tensor, differentiable w.r.t. both inputs.

    Raises:
        ConfigError: an unknown or invalid metric/level, a bad temperature, or
            shapes that cannot be paired.
    """
    check_pair(metric, level)
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature!r}")
    teacher = _paired_teacher(student, teacher, level)
    units = LEVELS.get(level)
    per_unit = METRICS.get(metric)(units(student), units(teacher), temperature)
    return per_unit.mean()


def _paired_teacher(student: Tensor, teacher: Tensor, level: str) -> Tensor:
    """Check the shapes and bring the teacher to the student's spatial size."""
    ndim = 2 if level == "logits" else 4
    layout = "B×K" if level == "logits" else "B×C×H×W"
    if student.dim() != ndim or teacher.dim() != ndim:
        raise ConfigError(
            f"level={level} expects {layout} tensors, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        what = "B and K" if level == "logits" else "B and C"
        raise ConfigError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            f"must agree in {what}"
        )
    if ndim == 4 and student.shape[-2:] != teacher.shape[-2:]:
        teacher = F.interpolate(
            teacher, size=student.shape[-2:], mode="bilinear", align_corners=False
        )
    return teacher
