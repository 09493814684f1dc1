"""The ``scd`` section of a trial: Self Correspondence Distillation's settings, the paper's values as defaults.

Values from SCD's public code (``Rongtao-Xu/RepresentationLearning``, folder
``SCD-AAAI2023``): ``scripts/dist_train_voc.py`` (loss weights, warm-up, the second
view's scale, the background scores, VARM, the multi-scale CAM, the head's 10× learning
rate), ``configs/voc_attn_reg.yaml`` (``cam_iters: 2000`` of ``max_iters: 20000``, CAM
scales 1, 0.5, 1.5), ``utils/corrloss.py`` (40×40 points), ``network/TSCD_model.py``
(head width). The pure functions of ``training.scd`` and ``postproc.varm`` take their
keyword defaults from here and from `training.config.refine.VarmStep`, so the section,
``wsss validate`` and a direct call never disagree. SCD's AFA-style attention-affinity
term (``0.1 · aux_loss``) is not here: it needs a MiT's attention maps and is AFA's, not
part of SCD's method.

The section applies to the paradigms whose name-table entry says ``scd``
(``self_correspondence``, ``scd_with_teacher``); `training.config.trial.TrialConfig`
refuses it on any other. Decisions where our setting is not the reference's:

- **Equivariance has a gradient.** SCD computes ``mean |down(A) − A'|`` on CAMs made
  under ``torch.no_grad``, so in its code the term is a constant that trains nothing.
  Here it reads the two training forwards' own scale-1 CAMs, so it pulls the
  backbone's CAMs of the two views together, as the paper's text says it should.
  ``equivariance_weight: 0`` trains exactly as the reference does.
- **The small view is rounded to the patch.** A ViT needs a side that is a multiple
  of its patch: ``scale`` × side is rounded to the nearest multiple, at least one
  patch (`small_view_side`). At 64 px with 8 px patches the paper's 0.3 gives 16 px,
  a 2×2 token grid; the CPU search space uses 0.5 (32 px, 4×4 tokens).
- **The head learns 10× faster** (``head_lr_mult``), as in the reference's optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.config.parse import check_int
from training.config.refine import VarmStep, check_varm_params
from training.errors import ConfigError

TERMS = ("cls", "seg", "energy", "corr", "equivariance")


def check_bg_scores(high: float, low: float) -> None:
    """Raise ConfigError unless 0 ≤ low ≤ high ≤ 1."""
    if not (_number(high) and _number(low) and 0.0 <= low <= high <= 1.0):
        raise ConfigError(f"bg_low, bg_high: expected 0 ≤ bg_low ≤ bg_high ≤ 1, got bg_low={low!r}, bg_high={high!r}")


def small_view_side(side: int, scale: float, multiple: int) -> int:
    """The second view's side: ``side · scale`` rounded to the nearest multiple of ``multiple``
    (a ViT's patch; 1 for a CNN), at least one ``multiple``.

    >>> small_view_side(64, 0.3, 8), small_view_side(64, 0.5, 8), small_view_side(512, 0.3, 16)
    (16, 32, 160)
    """
    return max(multiple, round(side * scale / multiple) * multiple)


def head_block_indices(depth: int, count: int) -> list[int]:
    """``count`` ViT blocks spread evenly over ``depth``, ending at the last (0-based).

    SegFormer's decoder reads MiT's 4 stages; a 12-block ViT gives blocks 2, 5, 8, 11
    (the usual choice for dense heads on plain ViTs). ``count`` ≥ ``depth`` gives every block.

    >>> head_block_indices(12, 4), head_block_indices(2, 4)
    ([2, 5, 8, 11], [0, 1])
    """
    count = min(count, depth)
    return [round((i + 1) * depth / count) - 1 for i in range(count)]


@dataclass(frozen=True)
class SCDConfig:
    """Self Correspondence Distillation: loss weights, warm-up and the settings of each term.

    The total loss after the warm-up is ``cls_weight·L_cls + seg_weight·L_seg +
    energy_weight·L_energy + corr_weight·L_corr + equivariance_weight·L_equivariance``
    (plus ``transfer.lam · L_transfer`` in ``scd_with_teacher``); during it,
    ``cls_weight·L_cls`` alone (:meth:`loss_weights`).
    """

    cls_weight: float = 1.0
    seg_weight: float = 0.1
    energy_weight: float = 0.01  # on top of the energy's own 1e-7 (training.scd.losses.ENERGY_WEIGHT)
    corr_weight: float = 0.1
    equivariance_weight: float = 0.1
    # SCD: 2,000 classification-only iterations of 20,000; a fraction, so it scales with our schedules
    warmup_fraction: float = 0.1
    points: int = 40  # P×P points per view for the correspondence loss (SCD's feature_samples)
    scale: float = 0.3  # the second view is the image resized by this factor (rounded: small_view_side)
    # scales of the no-gradient CAM behind the pseudo labels and the correspondence target, each with its
    # mirror image (cam_flip); SCD: 1, 0.5, 1.5 with flips. [1.0] without flip reads the training forward's
    # own CAM, detached: no extra forward pass
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    cam_flip: bool = True
    bg_high: float = 0.55  # background score foreground must beat (SCD's --high_thre)
    bg_low: float = 0.35  # background score under which a pixel is background (--low_thre)
    label_down_scale: int = 2  # VARM runs at 1/label_down_scale of the image size
    # the segmentation and energy losses read the head's logits and the pseudo labels at this fraction of the
    # image size (SCD: 1, the pseudo labels resized back up from VARM's size); 1/label_down_scale uses VARM's
    # labels as they are
    seg_scale: float = 1.0
    varm_dilations: tuple[int, ...] = VarmStep.dilations
    varm_iters: int = VarmStep.iters
    varm_w_rgb: float = VarmStep.w_rgb
    varm_w_var: float = VarmStep.w_var
    head_width: int = 256  # SegFormer decoder width (SCD's embedding_dim)
    head_dropout: float = 0.1
    head_blocks: int = 4  # ViT blocks the head decodes (head_block_indices); a CNN's head reads its last map
    head_lr_mult: float = 10.0  # the head's learning rate is train.lr times this (SCD's decoder groups)
    energy_sigma_rgb: float = 15.0  # colour deviation of the energy's Gaussian kernel, 0–255 units
    energy_sigma_xy: float = 100.0  # its spatial deviation in full-resolution pixels
    energy_scale: float = 0.5  # the energy is computed on the maps resized by this factor

    def check(self, path: str = "scd") -> None:
        """Raise ConfigError naming ``path.field`` for any out-of-range value."""
        for term in TERMS:
            name = f"{term}_weight"
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: expected a weight ≥ 0, got {getattr(self, name)!r}")
        _in_range(self.warmup_fraction, 0.0, 1.0, f"{path}.warmup_fraction", "a fraction of the steps in [0, 1]")
        check_int(f"{path}.points", self.points, low=1, what="P×P points per view")
        if not (_number(self.scale) and 0.0 < self.scale < 1.0):
            raise ConfigError(f"{path}.scale: expected a down-scaling factor in (0, 1), got {self.scale!r}")
        if not self.cam_scales or not all(_number(s) and s > 0 for s in self.cam_scales):
            raise ConfigError(f"{path}.cam_scales: expected a non-empty list of positive scales, got "
                              f"{list(self.cam_scales)!r}")
        _rename(check_bg_scores, path, high=self.bg_high, low=self.bg_low)
        check_int(f"{path}.label_down_scale", self.label_down_scale, low=1)
        if not (_number(self.seg_scale) and 0.0 < self.seg_scale <= 1.0):
            raise ConfigError(f"{path}.seg_scale: expected a resize factor in (0, 1], got {self.seg_scale!r}")
        _rename(check_varm_params, path, "varm_", dilations=self.varm_dilations, iters=self.varm_iters,
                w_rgb=self.varm_w_rgb, w_var=self.varm_w_var)
        check_int(f"{path}.head_width", self.head_width, low=1)
        check_int(f"{path}.head_blocks", self.head_blocks, low=1)
        if not (_number(self.head_dropout) and 0.0 <= self.head_dropout < 1.0):
            raise ConfigError(f"{path}.head_dropout: expected a probability in [0, 1), got {self.head_dropout!r}")
        if not (_number(self.head_lr_mult) and self.head_lr_mult > 0):
            raise ConfigError(f"{path}.head_lr_mult: expected a factor > 0, got {self.head_lr_mult!r}")
        for name in ("energy_sigma_rgb", "energy_sigma_xy"):
            if not (_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{path}.{name}: expected a deviation > 0, got {getattr(self, name)!r}")
        if not (_number(self.energy_scale) and 0.0 < self.energy_scale <= 1.0):
            raise ConfigError(f"{path}.energy_scale: expected a resize factor in (0, 1], got {self.energy_scale!r}")
        if self.energy_scale > self.seg_scale:
            raise ConfigError(f"{path}.energy_scale: expected ≤ {path}.seg_scale ({self.seg_scale}), the size of the "
                              f"maps the energy is computed from, got {self.energy_scale}")

    @property
    def own_cam(self) -> bool:
        """The targets read the training forward's own CAM (``cam_scales: [1.0]``, no flip)."""
        return tuple(self.cam_scales) == (1.0,) and not self.cam_flip

    def warmup_steps(self, total_steps: int) -> int:
        """How many of the first optimisation steps of a ``total_steps`` run train the classifier alone."""
        return round(self.warmup_fraction * total_steps)

    def loss_weights(self, step: int, total_steps: int) -> dict[str, float]:
        """Each term's weight at optimisation step ``step`` (0-based) of ``total_steps``.

        Steps ``0 … warmup_steps − 1`` use ``cls`` alone, every later step every
        term, as SCD's ``n_iter <= cam_iters`` switch (which also holds back the
        correspondence and equivariance terms). SCD's test gives 2,001 warm-up steps
        for ``cam_iters: 2000``; the extra step is not copied, so a fraction of 0
        means no warm-up.
        """
        warm = step < self.warmup_steps(total_steps)
        return {term: (getattr(self, f"{term}_weight") if term == "cls" or not warm else 0.0) for term in TERMS}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: object, low: float, high: float, field: str, expected: str) -> None:
    if not (_number(value) and low <= value <= high):
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")


def _rename(check, path: str, prefix: str = "", *args, **kwargs) -> None:
    """Run a check and re-raise its error under the config field's name."""
    try:
        check(*args, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path}.{prefix}{err}") from None
