"""SCD's settings as one frozen dataclass, with the values of the public code as defaults.

Values from ``Rongtao-Xu/RepresentationLearning``, ``SCD-AAAI2023``:
``scripts/dist_train_voc.py`` (loss weights, warm-up, scale, thresholds, VARM),
``configs/voc_attn_reg.yaml`` (``cam_iters: 2000`` of ``max_iters: 20000``),
``utils/corrloss.py`` (40×40 points), ``network/TSCD_model.py`` (head width).
SCD's AFA-style attention-affinity term (``0.1 · aux_loss``) is not here: it
needs the backbone's attention maps and is AFA's, not part of SCD's method.
"""

from __future__ import annotations

from dataclasses import dataclass

from postproc.neighbours import DILATIONS, ITERS
from postproc.varm import W_RGB, W_VAR, check_varm_params
from training.errors import ConfigError
from training.scd.correspondence import POINTS
from training.scd.head import HEAD_DROPOUT, HEAD_WIDTH
from training.scd.labels import BG_HIGH, BG_LOW, DOWN_SCALE, check_bg_scores
from training.scd.losses import ENERGY_SCALE, ENERGY_SIGMA_RGB, ENERGY_SIGMA_XY

TERMS = ("cls", "seg", "energy", "corr", "equivariance")


@dataclass(frozen=True)
class SCDConfig:
    """Self Correspondence Distillation: loss weights, warm-up and the settings of each term.

    The total loss after the warm-up is ``cls_weight·L_cls + seg_weight·L_seg +
    energy_weight·L_energy + corr_weight·L_corr + equivariance_weight·L_equivariance``;
    during it, ``cls_weight·L_cls`` alone (:meth:`loss_weights`).
    """

    cls_weight: float = 1.0
    seg_weight: float = 0.1
    energy_weight: float = 0.01  # on top of the energy's own 1e-7 (training.scd.losses.ENERGY_WEIGHT)
    corr_weight: float = 0.1
    equivariance_weight: float = 0.1
    # SCD: 2,000 classification-only iterations of 20,000; a fraction, so it scales with our schedules
    warmup_fraction: float = 0.1
    points: int = POINTS  # P×P points per view for the correspondence loss
    scale: float = 0.3  # the second view is the image resized by this factor
    bg_high: float = BG_HIGH  # background score foreground must beat (pseudo labels)
    bg_low: float = BG_LOW  # background score under which a pixel is background
    label_down_scale: int = DOWN_SCALE  # VARM runs at 1/label_down_scale of the image size
    varm_dilations: tuple[int, ...] = DILATIONS
    varm_iters: int = ITERS
    varm_w_rgb: float = W_RGB
    varm_w_var: float = W_VAR
    head_width: int = HEAD_WIDTH
    head_dropout: float = HEAD_DROPOUT
    energy_sigma_rgb: float = ENERGY_SIGMA_RGB
    energy_sigma_xy: float = ENERGY_SIGMA_XY
    energy_scale: float = ENERGY_SCALE

    def check(self, path: str = "scd") -> None:
        """Raise ConfigError naming ``path.field`` for any out-of-range value."""
        for term in TERMS:
            name = f"{term}_weight"
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: expected a weight ≥ 0, got {getattr(self, name)!r}")
        _in_range(self.warmup_fraction, 0.0, 1.0, f"{path}.warmup_fraction", "a fraction of the steps in [0, 1]")
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 1:
            raise ConfigError(f"{path}.points: expected an integer ≥ 1 (P×P points per view), got {self.points!r}")
        if not (_number(self.scale) and 0.0 < self.scale < 1.0):
            raise ConfigError(f"{path}.scale: expected a down-scaling factor in (0, 1), got {self.scale!r}")
        _rename(check_bg_scores, path, high=self.bg_high, low=self.bg_low)
        if isinstance(self.label_down_scale, bool) or not isinstance(self.label_down_scale, int) \
                or self.label_down_scale < 1:
            raise ConfigError(f"{path}.label_down_scale: expected an integer ≥ 1, got {self.label_down_scale!r}")
        _rename(check_varm_params, path, "varm_", dilations=self.varm_dilations, iters=self.varm_iters,
                w_rgb=self.varm_w_rgb, w_var=self.varm_w_var)
        if isinstance(self.head_width, bool) or not isinstance(self.head_width, int) or self.head_width < 1:
            raise ConfigError(f"{path}.head_width: expected an integer ≥ 1, got {self.head_width!r}")
        if not (_number(self.head_dropout) and 0.0 <= self.head_dropout < 1.0):
            raise ConfigError(f"{path}.head_dropout: expected a probability in [0, 1), got {self.head_dropout!r}")
        for name in ("energy_sigma_rgb", "energy_sigma_xy"):
            if not (_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{path}.{name}: expected a deviation > 0, got {getattr(self, name)!r}")
        if not (_number(self.energy_scale) and 0.0 < self.energy_scale <= 1.0):
            raise ConfigError(f"{path}.energy_scale: expected a resize factor in (0, 1], got {self.energy_scale!r}")

    def warmup_steps(self, total_steps: int) -> int:
        """How many of the first optimisation steps of a ``total_steps`` run train the classifier alone."""
        return round(self.warmup_fraction * total_steps)

    def loss_weights(self, step: int, total_steps: int) -> dict[str, float]:
        """Each term's weight at optimisation step ``step`` (0-based) of ``total_steps``.

        Steps ``0 … warmup_steps − 1`` use ``cls`` alone, every later step every
        term. (SCD's test ``n_iter <= cam_iters`` gives 2,001 warm-up steps for
        ``cam_iters: 2000``; the extra step is not copied, so a fraction of 0
        means no warm-up.)
        """
        warm = step < self.warmup_steps(total_steps)
        return {term: (getattr(self, f"{term}_weight") if term == "cls" or not warm else 0.0) for term in TERMS}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: object, low: float, high: float, field: str, expected: str) -> None:
    if not (_number(value) and low <= value <= high):
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")


def _rename(check, path: str, prefix: str = "", *args, **kwargs) -> None:
    """Run a postproc check and re-raise its error under the config field's name."""
    try:
        check(*args, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path}.{prefix}{err}") from None
