"""Refinement pipelines as a config says them: one frozen dataclass per step.

A pipeline is an ordered list of steps, each written ``{step: name, **fields}``::

    - {step: crf, scale: 12}
    - {step: regions, backend: sam, rule: iou, fusion: copy,
       proposal_params: {checkpoint: sam_vit_b_01ec64.pth, points_per_side: 32}}

:data:`STEPS` maps a step name to its dataclass, which owns the step's defaults
and ranges. The pure functions of ``postproc`` take their keyword defaults from
these dataclasses (``crf_refine(..., scale=CrfStep.scale)``), so a sweep file,
``wsss validate`` and a direct call can never disagree. A new step is one
dataclass registered here plus one builder registered in `postproc.pipeline`.

A pipeline is named by its :attr:`StepSpec.key`, built from the fields written
explicitly (``crf(scale=12)``), so refinement folders and MLflow keys stay the
same whatever the defaults. In a sweep file's ``refine:`` section any field may
be ``{grid: [...]}`` instead (see `training.config.sweep.expand_refine_grid`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from training.config import names
from training.config.parse import check_int, check_range, shallow_fields
from training.errors import ConfigError, did_you_mean
from training.registry import Registry

STEPS: Registry[type] = Registry("refinement step")
BACKENDS: Registry[type] = Registry("region-proposal backend")  # name → its parameters' dataclass
SEED_KEY = "seed"  # the key of the empty pipeline: the thresholded CAM alone

# ---------------------------------------------------------------- proposal backends


@BACKENDS.register("superpixel")
@dataclass(frozen=True)
class SuperpixelParams:
    """`postproc.proposals.SuperpixelProposals`: one proposal per superpixel (CPU)."""

    uses_gpu: ClassVar[bool] = False
    method: str = "felzenszwalb"  # felzenszwalb | slic
    scale: float = 100.0  # felzenszwalb: higher means larger segments
    sigma: float = 0.8  # Gaussian pre-smoothing width, both methods
    min_size: int = 20  # felzenszwalb: smallest segment, px
    n_segments: int = 100  # slic: approximate number of segments
    compactness: float = 10.0  # slic: higher gives squarer segments

    def __post_init__(self) -> None:
        names.SUPERPIXEL_METHODS.check(self.method, field="method")
        check_range("scale", self.scale, low=0.0, low_open=True)
        check_range("sigma", self.sigma, low=0.0)
        check_range("min_size", self.min_size, low=1)
        check_range("n_segments", self.n_segments, low=1)
        check_range("compactness", self.compactness, low=0.0, low_open=True)


@BACKENDS.register("sam")
@dataclass(frozen=True)
class SamParams:
    """`postproc.proposals.SamProposals`: segment-anything's automatic mask generator (GPU)."""

    uses_gpu: ClassVar[bool] = True
    model_type: str = "vit_b"  # a key of segment_anything.sam_model_registry
    checkpoint: str | os.PathLike | None = None  # a local SAM state-dict file; nothing is downloaded
    points_per_side: int = 32  # point-prompt grid; 32 in the thesis (16 lost 0.5 IoU)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_mask_region_area: int = 0  # px
    points_per_batch: int = 64  # prompts per decoder call: memory vs speed, same masks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model: Any = None  # a ready segment_anything Sam, instead of model_type + checkpoint
    model_builder: Any = None  # () → an untrained Sam of a custom architecture (tests)

    def __post_init__(self) -> None:
        check_range("points_per_side", self.points_per_side, low=1)
        check_range("pred_iou_thresh", self.pred_iou_thresh, low=0.0, high=1.0)
        check_range("stability_score_thresh", self.stability_score_thresh, low=0.0, high=1.0)
        check_range("min_mask_region_area", self.min_mask_region_area, low=0)
        check_range("points_per_batch", self.points_per_batch, low=1)
        if self.model is None and self.model_builder is None:
            names.SAM_MODEL_TYPES.check(self.model_type, field="model_type")
        if self.model is None and self.checkpoint is None:
            raise ConfigError(
                "checkpoint: expected the path of a local SAM checkpoint file, got None (no weights can be downloaded)"
            )


# Backend arguments that do not change the masks stay out of pipeline keys.
_NOT_IN_KEY = frozenset({"device", "points_per_batch"})


# ---------------------------------------------------------------- neighbourhood propagation (PAR, VARM)

PROPAGATION_DILATIONS = (1, 2, 4, 8, 12, 24)  # AFA, ToCo and SCD all build PAR / VARM with these
PROPAGATION_ITERS = 10  # propagation steps (AFA's COCO script uses 15)


def check_dilations(dilations: Any) -> tuple[int, ...]:
    """Return ``dilations`` as a tuple, or raise ConfigError unless they are positive integers."""
    values = tuple(dilations) if isinstance(dilations, (list, tuple)) else None
    if not values or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in values):
        raise ConfigError(f"dilations: expected a non-empty list of integers ≥ 1, got {dilations!r}")
    return values


def check_iters(iters: Any) -> int:
    """Return ``iters``, or raise ConfigError unless it is an integer ≥ 0."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters: expected an integer ≥ 0 (propagation steps), got {iters!r}")
    return iters


# ---------------------------------------------------------------- steps


@STEPS.register("threshold")
@dataclass(frozen=True)
class ThresholdStep:
    """cam → seed mask: smoke where the activation is ≥ ``threshold`` (`postproc.threshold.seed_mask`)."""

    starts_from_cam: ClassVar[bool] = True
    uses_gpu: ClassVar[bool] = False
    threshold: float = 0.3  # the thesis's seed threshold, in [0, 1]

    def __post_init__(self) -> None:
        check_range("threshold", self.threshold, low=0.0, high=1.0)


@dataclass(frozen=True)
class CrfRecipe:
    """The unary exponent, kernels, iterations and decision rule of one dense-CRF recipe."""

    alpha: float  # exponent on the background probability (1 − cam)^alpha
    iters: int
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    decision: str  # "threshold": foreground probability ≥ fg_threshold; "argmax": the likelier label
    source: str


CRF_RECIPES: Registry[CrfRecipe] = Registry.of("CRF recipe", {
    "thesis": CrfRecipe(
        alpha=48.0, iters=5, gauss_sxy=3.0, gauss_compat=5.0, bilateral_sxy=60.0, bilateral_srgb=5.0,
        bilateral_compat=15.0, decision="threshold",
        source="the thesis's post_processing/CRF.py: p = [(1−cam)^48, cam], kernels 3/5 and 60/5/15, 5 iterations, "
               "smoke where the refined foreground probability ≥ the CAM threshold",
    ),
    "psa": CrfRecipe(
        alpha=1.0, iters=10, gauss_sxy=3.0, gauss_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
        bilateral_compat=10.0, decision="argmax",
        source="the psa/IRN kernels 3/3 and 80/13/10, 10 iterations, argmax (this project's CRF before)",
    ),
})  # fmt: skip
CRF_DECISIONS = ("threshold", "argmax")


@STEPS.register("crf")
@dataclass(frozen=True)
class CrfStep:
    """image, cam → dense-CRF mask (`postproc.crf.crf_refine`); spatial deviations are divided by ``scale``.

    ``recipe`` gives every kernel value, the unary's exponent, the iterations and the
    decision rule; a field set explicitly overrides the recipe's value (None = the recipe's).
    """

    starts_from_cam: ClassVar[bool] = True
    uses_gpu: ClassVar[bool] = False
    key_always: ClassVar[tuple[str, ...]] = ("recipe",)  # refinement results name the recipe they used
    recipe: str = "thesis"  # a name in CRF_RECIPES
    scale: float = 12.0  # the thesis's scale factor: 12–16 best, 2 collapsed; > 0
    alpha: float | None = None  # exponent on the background probability (1 − cam)^alpha, > 0
    iters: int | None = None  # mean-field iterations, ≥ 1
    gauss_sxy: float | None = None  # smoothness kernel: spatial deviation before scaling, px
    gauss_compat: float | None = None  # smoothness kernel weight, ≥ 0
    bilateral_sxy: float | None = None  # appearance kernel: spatial deviation before scaling, px
    bilateral_srgb: float | None = None  # appearance kernel: colour deviation, 0–255 units
    bilateral_compat: float | None = None  # appearance kernel weight, ≥ 0
    decision: str | None = None  # threshold | argmax
    fg_threshold: float | None = None  # decision threshold: None = the trial's cam.threshold (the seed's)

    def __post_init__(self) -> None:
        CRF_RECIPES.check(self.recipe, field="recipe")
        r = self.resolved()
        check_int("iters", r["iters"], low=1, what="mean-field iterations")
        for name in ("alpha", "scale", "gauss_sxy", "bilateral_sxy", "bilateral_srgb"):
            check_range(name, r[name], low=0.0, low_open=True)
        check_range("gauss_compat", r["gauss_compat"], low=0.0)
        check_range("bilateral_compat", r["bilateral_compat"], low=0.0)
        if r["decision"] not in CRF_DECISIONS:
            raise ConfigError(f"decision: expected one of {', '.join(CRF_DECISIONS)}, got {r['decision']!r}")
        if self.fg_threshold is not None:
            check_range("fg_threshold", self.fg_threshold, low=0.0, high=1.0)

    def resolved(self) -> dict[str, Any]:
        """Every parameter of `postproc.crf.crf_refine` except ``fg_threshold``: the recipe's
        values with the explicitly set fields on top."""
        recipe = dataclasses.asdict(CRF_RECIPES.get(self.recipe, field="recipe"))
        del recipe["source"]
        given = {k: v for k, v in shallow_fields(self).items() if v is not None and k in recipe}
        return recipe | given | {"scale": self.scale}


@STEPS.register("varm")
@dataclass(frozen=True)
class VarmStep:
    """image, cam → the CAM refined by VARM, SCD's variation-aware propagation
    (`postproc.varm.varm_refine_np`, weights normalised so the CAM stays in [0, 1]).

    It refines the CAM, not a mask: the steps after it (``crf``, ``threshold``, another
    propagation) read the refined CAM, and a pipeline ending with it thresholds it at
    the trial's ``cam.threshold``.
    """

    starts_from_cam: ClassVar[bool] = True
    refines_cam: ClassVar[bool] = True
    uses_gpu: ClassVar[bool] = False
    dilations: tuple[int, ...] = PROPAGATION_DILATIONS  # neighbourhood radii, px
    iters: int = PROPAGATION_ITERS  # propagation steps, ≥ 0
    w_rgb: float = 0.25  # colour kernel width in units of the local colour deviation (SCD: |ΔI|/σ · 4), > 0
    w_var: float = 0.01  # weight of the local-variation penalty (SCD's w2), in [0, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", check_dilations(self.dilations))  # a YAML list → a tuple
        check_varm_params(dilations=self.dilations, iters=self.iters, w_rgb=self.w_rgb, w_var=self.w_var)


def check_varm_params(*, dilations: Any, iters: Any, w_rgb: Any, w_var: Any) -> None:
    """Raise ConfigError, naming the parameter, for any out-of-range VARM setting."""
    check_dilations(dilations)
    check_iters(iters)
    check_range("w_rgb", w_rgb, low=0.0, low_open=True)
    # w_var ≥ 1 would make the weights sum to ≤ 0 and the propagation meaningless
    check_range("w_var", w_var, low=0.0, high=1.0, high_open=True)


@STEPS.register("par")
@dataclass(frozen=True)
class ParStep:
    """image, cam → the CAM refined by PAR, AFA's pixel-adaptive propagation
    (`postproc.par.par_refine_np`, weights normalised); a CAM refinement like `VarmStep`."""

    starts_from_cam: ClassVar[bool] = True
    refines_cam: ClassVar[bool] = True
    uses_gpu: ClassVar[bool] = False
    dilations: tuple[int, ...] = PROPAGATION_DILATIONS  # neighbourhood radii, px
    iters: int = PROPAGATION_ITERS  # propagation steps, ≥ 0
    w_rgb: float = 0.3  # colour kernel width in units of the local colour deviation (AFA's w1), > 0
    w_pos: float = 0.01  # weight of the position kernel (AFA's w2), ≥ 0
    pos_temperature: float = 0.3  # position kernel width in units of the distance deviation (AFA reuses w1), > 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", check_dilations(self.dilations))
        check_par_params(dilations=self.dilations, iters=self.iters, w_rgb=self.w_rgb, w_pos=self.w_pos,
                         pos_temperature=self.pos_temperature)


def check_par_params(*, dilations: Any, iters: Any, w_rgb: Any, w_pos: Any, pos_temperature: Any) -> None:
    """Raise ConfigError, naming the parameter, for any out-of-range PAR setting."""
    check_dilations(dilations)
    check_iters(iters)
    check_range("w_rgb", w_rgb, low=0.0, low_open=True)
    check_range("w_pos", w_pos, low=0.0)
    check_range("pos_temperature", pos_temperature, low=0.0, low_open=True)


@STEPS.register("regions")
@dataclass(frozen=True)
class RegionsStep:
    """image, current mask → the mask snapped to region proposals
    (`postproc.regions.refine_with_proposals`, proposals from ``backend``)."""

    starts_from_cam: ClassVar[bool] = False
    backend: str = "superpixel"  # a name in BACKENDS
    proposal_params: Mapping[str, Any] = field(default_factory=dict)  # that backend's fields
    rule: str = "iou"  # a name in names.SELECTION_RULES
    fusion: str = "copy"  # a name in names.FUSION_MODES
    iou_threshold: float = 0.35  # iou rule: smallest IoU with the seed to keep a proposal
    max_area: float = 0.5  # proposals covering more of the image are dropped
    inside_fraction: float = 0.5  # majority rule: keep when more than this lies inside the seed
    coverage: float = 0.85  # majority rule: keep when it covers at least this much of the seed

    def __post_init__(self) -> None:
        if not isinstance(self.proposal_params, Mapping):
            raise ConfigError(
                f"proposal_params: expected a mapping of {self.backend} arguments, got {self.proposal_params!r}"
            )
        backend = BACKENDS.get(self.backend, field="backend")
        check_fields(backend, self.proposal_params, f"proposal_params of backend {self.backend!r}")
        try:
            backend(**self.proposal_params)
        except ConfigError as err:  # every message starts with the field's name
            raise ConfigError(f"proposal_params.{err}") from err
        check_selection(self.rule, self.iou_threshold, self.max_area, self.inside_fraction, self.coverage)
        names.FUSION_MODES.check(self.fusion, field="fusion")

    @functools.cached_property
    def proposals(self) -> Any:
        """The backend's parameters, defaults filled in (a `BACKENDS` dataclass)."""
        return BACKENDS.get(self.backend)(**self.proposal_params)

    @property
    def uses_gpu(self) -> bool:
        return self.proposals.uses_gpu

    def selection(self) -> dict[str, Any]:
        """Keyword arguments of `postproc.regions.refine_with_proposals`."""
        kwargs = shallow_fields(self)
        del kwargs["backend"], kwargs["proposal_params"]
        return kwargs


def check_selection(rule: str, iou_threshold: float, max_area: float, inside_fraction: float, coverage: float) -> None:
    """Raise ConfigError for an unknown selection rule or a fraction outside [0, 1]."""
    names.SELECTION_RULES.check(rule, field="rule")
    values = {"iou_threshold": iou_threshold, "max_area": max_area, "inside_fraction": inside_fraction}
    for name, value in (values | {"coverage": coverage}).items():
        check_range(name, value, low=0.0, high=1.0)


def check_fields(cls: type, params: Mapping[str, Any], what: str) -> None:
    """Raise ConfigError naming every key of ``params`` that ``cls`` has no field for
    (and the nearest valid one); ``what`` says whose fields they are."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(map(str, set(params) - set(valid)))
    if unknown:
        hint = did_you_mean(unknown[0], valid) if len(unknown) == 1 else ""
        raise ConfigError(f"{what} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}{hint}")


def parse_fields(cls: type, params: Mapping[str, Any], what: str) -> Any:
    """``cls(**params)``, unknown keys refused first (see `check_fields`)."""
    check_fields(cls, params, what)
    return cls(**params)


# ---------------------------------------------------------------- one step as written


def _format_value(name: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):  # dilations: [1, 2, 4] and (1, 2, 4) name the same setting
        return "[" + " ".join(_format_value(name, v) for v in value) + "]"
    if name == "checkpoint" and isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.fspath(value))  # keys must not depend on the machine
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral) or isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Real):  # 12 and 12.0 name the same setting
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    return getattr(value, "__name__", type(value).__name__)


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step as written: its name and the fields given explicitly.

    Attributes:
        name: a name in :data:`STEPS`.
        params: the fields given (``proposal_params`` nested for ``regions``).
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], *, where: str = "step") -> StepSpec:
        """Parse ``{"step": name, **params}``."""
        if not isinstance(entry, Mapping) or "step" not in entry:
            raise ConfigError(
                f"{where}: expected a mapping with a 'step' key naming one of {', '.join(STEPS.names())}, got {entry!r}"
            )
        return cls(name=entry["step"], params={k: v for k, v in entry.items() if k != "step"})

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, **self.params}

    def typed(self, *, where: str = "step") -> Any:
        """The step's dataclass with these fields (defaults filled in), validated.

        Raises:
            ConfigError: unknown step or field (the nearest valid name suggested),
                or a bad value, naming ``where`` and the field.
        """
        cls = STEPS.get(self.name, field=f"{where}.step")
        check_fields(cls, self.params, f"{where}: step {self.name!r}")
        try:
            return cls(**self.params)
        except ConfigError as err:
            raise ConfigError(f"{where} ({self.name}): {err}") from err

    @property
    def key(self) -> str:
        """Stable short name, e.g. ``crf(recipe=thesis,scale=12)``: the explicit parameters and
        those a step always names (``key_always``), sorted."""
        cls = STEPS.get(self.name) if self.name in STEPS else None
        params = {name: getattr(cls, name) for name in getattr(cls, "key_always", ())} | self.params
        parts = []
        for name in sorted(params):
            value = params[name]
            if isinstance(value, Mapping):
                prefix = self.params.get("backend", RegionsStep.backend)
                parts += [f"{prefix}.{k}={_format_value(k, value[k])}" for k in sorted(value) if k not in _NOT_IN_KEY]
            else:
                parts.append(f"{name}={_format_value(name, value)}")
        return f"{self.name}({','.join(parts)})"


# ---------------------------------------------------------------- a whole pipeline


def parse_pipeline(entries: Iterable[Mapping[str, Any] | StepSpec]) -> list[tuple[StepSpec, Any]]:
    """Every step of a pipeline as written and as its validated dataclass.

    Raises:
        ConfigError: not a list, an unknown step or field, a bad value, or a step
            that starts from the CAM (``threshold``, ``crf``, ``varm``, ``par``) after
            a step that made a mask; the message names ``pipeline[i]`` and the field.
    """
    if isinstance(entries, (Mapping, str)) or not isinstance(entries, Iterable):
        raise ConfigError(f"pipeline: expected a list of steps, got {entries!r}")
    steps = []
    for index, entry in enumerate(entries):
        where = f"pipeline[{index}]"
        spec = entry if isinstance(entry, StepSpec) else StepSpec.from_dict(entry, where=where)
        step = spec.typed(where=where)
        # CAM refinements (varm, par) hand a CAM on; any other step makes a mask that a step
        # reading the CAM would discard
        made_mask = [s.name for s, earlier in steps if not getattr(earlier, "refines_cam", False)]
        if step.starts_from_cam and made_mask:
            raise ConfigError(
                f"{where}: step {spec.name!r} starts again from the CAM and would discard the mask of "
                f"{made_mask[-1]!r} before it; it may only be the first step or follow CAM refinements "
                f"({', '.join(n for n in STEPS.names() if getattr(STEPS.get(n), 'refines_cam', False))})"
            )
        steps.append((spec, step))
    return steps


def pipeline_key(entries: Iterable[Mapping[str, Any] | StepSpec]) -> str:
    """The pipeline's name, e.g. ``crf(scale=12)+regions(fusion=copy)``; ``seed`` if empty."""
    keys = [
        (StepSpec.from_dict(entry, where=f"pipeline[{i}]") if isinstance(entry, Mapping) else entry).key
        for i, entry in enumerate(entries)
    ]
    return "+".join(keys) or SEED_KEY


def pipeline_uses_gpu(spec: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a step of the pipeline proposes regions with a GPU backend (SAM)."""
    return any(step.uses_gpu for _, step in parse_pipeline(spec))
