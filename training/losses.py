"""Knowledge-transfer losses between a student and a teacher (or a co-training peer).

A loss is chosen by two names from the search space: an *alignment level*, which
turns a feature map into paired "units" ``B×N×D`` (N units per sample, each a
D-vector), and a *metric*, which turns each pair of units into one number. The
loss is that number averaged over units and batch. The names are resolved once,
when a trial builds its paradigm, and the training step calls the result::

    loss = build_transfer_loss("cosine", "global")   # checks the pair, looks both up
    loss(student, teacher)                           # every step: no lookup, no check

(``transfer_loss(student, teacher, metric=..., level=...)`` does both at once.)
Which names exist, and which pairs are allowed, is the schema's
(`training.config.names`); the registries here hold the implementations.

Inputs are the two maps being aligned, ``B×C×H×W`` with the same C (the student's
projected features and the teacher's target, `training.paradigms`), or ``B×K`` logits
for level ``logits``. When the spatial sizes differ the teacher map is resized to the
student's. Every (metric, level) pair the thesis's code defines computes its formula
(`training.config.names.THESIS_PAIRS`; ``tests/thesis_reference.py`` is the oracle);
the variants we added (``mse``, ``channel_matched``, ``gram_flat``) have their own names.

The loss is differentiable w.r.t. both inputs, because co-training updates both
networks; teacher-student callers detach the teacher themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import names
from training.config.names import check_pair
from training.errors import ConfigError
from training.registry import Registry

UnitsFn = Callable[[Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor, float], Tensor]

METRICS: Registry[MetricFn] = Registry("transfer metric", names=names.TRANSFER_METRICS)
LEVELS: Registry[UnitsFn] = Registry("alignment level", names=names.ALIGNMENT_LEVELS)

COSINE_EPS = 1e-8


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
    """Each channel's flattened spatial map. The level is all-pairs (`names.LevelInfo`):
    every student channel is compared with every teacher channel, as the thesis does.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×C×(H·W)``.
    """
    return features.flatten(2)


# Same units as `channel`; only the pairing differs (channel i with channel i, ours), and the
# pairing is the level's fact in `names.LevelInfo`, read by the distance, not by the units.
LEVELS.register("channel_matched")(channel_units)


@LEVELS.register("spatial_map")
def spatial_map_units(features: Tensor) -> Tensor:
    """The channel-mean map of each sample as one unit.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×1×(H·W)``.
    """
    return features.mean(dim=1).flatten(1).unsqueeze(1)


def _gram(features: Tensor) -> Tensor:
    """``G = F·Fᵀ / (H·W)``, B×C×C (the 1/(H·W) leaves every cosine unchanged)."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


@LEVELS.register("gram")
def gram_column_units(features: Tensor) -> Tensor:
    """The columns of the channel Gram matrix as units: the thesis's "inner product"
    level takes one cosine per column ``G[:, k]``.

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×C×C``: unit k is column k of G (G is symmetric, so also its row k).
    """
    return _gram(features).transpose(1, 2)


@LEVELS.register("gram_flat")
def gram_flat_units(features: Tensor) -> Tensor:
    """The whole channel Gram matrix as one unit (ours).

    Args:
        features: ``B×C×H×W``.

    Returns:
        ``B×1×(C·C)``, G flattened row-major.
    """
    return _gram(features).flatten(1).unsqueeze(1)


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
    """Euclidean norm ``‖s − t‖₂`` over D per unit pair, as the thesis computes it: not
    its square, not a mean, so it is √D times an RMS and its gradient has unit length
    whatever the distance. ``temperature`` is unused.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.

    Returns:
        ``B×N``, ≥ 0.
    """
    return torch.linalg.vector_norm(student - teacher, dim=-1)  # its gradient at s = t is 0, not NaN


@METRICS.register("mse")
def mean_squared_distance(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared difference over D per unit pair (ours); ``temperature`` is unused.

    Args:
        student: units ``B×N×D``.
        teacher: units ``B×N×D``.

    Returns:
        ``B×N``, ≥ 0.
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


@dataclass(frozen=True)
class TransferLoss:
    """A transfer loss with its names resolved: ``loss(student, teacher)`` → scalar.

    Built once per trial by `build_transfer_loss`; a call looks nothing up and
    checks only the shapes.

    Attributes:
        metric: the metric function (a `METRICS` entry).
        units: the level's unit function (a `LEVELS` entry).
        level: the level's name, for error messages.
        on_logits: the level pairs B×K logits rather than B×C×H×W feature maps.
        all_pairs: compare every student unit with every teacher unit.
        temperature: T for metric ``kl``; unused by the others.
    """

    metric: MetricFn
    units: UnitsFn
    level: str
    on_logits: bool
    all_pairs: bool
    temperature: float

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Args: ``B×C×H×W`` projected features (teacher resized bilinearly to the
        student's H×W when they differ), or ``B×K`` logits when `on_logits`.
        Returns a scalar tensor, differentiable w.r.t. both inputs."""
        teacher = self._paired_teacher(student, teacher)
        s, t = self.units(student), self.units(teacher)
        if self.all_pairs:  # B×N×1×D against B×1×N×D: every pair, B×N×N values
            s, t = s.unsqueeze(2), t.unsqueeze(1)
        return self.metric(s, t, self.temperature).mean()

    def _paired_teacher(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Check the shapes and bring the teacher to the student's spatial size."""
        ndim, layout = (2, "B×K") if self.on_logits else (4, "B×C×H×W")
        if student.dim() != ndim or teacher.dim() != ndim:
            raise ConfigError(
                f"level={self.level} expects {layout} tensors, got student "
                f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        if student.shape[:2] != teacher.shape[:2]:
            what = "B and K" if self.on_logits else "B and C"
            raise ConfigError(
                f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree in {what}"
            )
        if ndim == 4 and student.shape[-2:] != teacher.shape[-2:]:
            teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
        return teacher


def build_transfer_loss(metric: str, level: str, *, temperature: float = 1.0) -> TransferLoss:
    """Resolve a (metric, level) pair once.

    Args:
        metric: a name in ``METRICS`` (``cosine``, ``l1``, ``l2``, ``mse``, ``kl``).
        level: a name in ``LEVELS`` (``global``, ``spatial``, ``channel``, ``channel_matched``,
            ``spatial_map``, ``gram``, ``gram_flat``, ``logits``).
        temperature: T for metric ``kl`` (loss scaled by T²); > 0.

    Raises:
        ConfigError: an unknown or invalid metric/level, or a bad temperature.
    """
    check_pair(metric, level)
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature!r}")
    info = names.ALIGNMENT_LEVELS.get(level)
    return TransferLoss(
        METRICS.get(metric, field="metric"),
        LEVELS.get(level, field="level"),
        level,
        info.on_logits,
        info.all_pairs,
        temperature,
    )


def transfer_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    metric: str,
    level: str,
    temperature: float = 1.0,
) -> Tensor:
    """Knowledge-transfer loss between student and teacher features or logits, in one call
    (`build_transfer_loss` then apply; a training loop builds once instead).

    Args:
        student: ``B×C×H×W`` projected features, or ``B×K`` logits for level ``logits``.
        teacher: ``B×C×H'×W'`` (resized bilinearly to H×W when the sizes
            differ), or ``B×K`` logits.
        metric: a name in ``METRICS``.
        level: a name in ``LEVELS``.
        temperature: T for metric ``kl`` (loss scaled by T²); > 0.

    Returns:
        A scalar tensor, differentiable w.r.t. both inputs.

    Raises:
        ConfigError: an unknown or invalid metric/level, a bad temperature, or
            shapes that cannot be paired.
    """
    return build_transfer_loss(metric, level, temperature=temperature)(student, teacher)
