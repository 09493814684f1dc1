"""Refinement pipelines: an ordered list of named steps from CAM + image to a mask.

A pipeline is written as a list of dicts, each naming a step from :data:`STEPS`
and its keyword arguments, e.g. (YAML)::

    - {step: crf, scale: 12}
    - {step: regions, backend: sam, rule: iou, fusion: copy,
       proposal_params: {checkpoint: sam_vit_b_01ec64.pth, points_per_side: 32}}

Steps:

- ``threshold``: cam → seed mask (:func:`postproc.threshold.seed_mask`).
- ``crf``: image, cam → mask (:func:`postproc.crf.crf_refine`).
- ``regions``: image, current mask → mask fused with region proposals
  (:func:`postproc.regions.refine_with_proposals`, proposals from
  :func:`postproc.proposals.build_proposals`).

``threshold`` and ``crf`` start from the CAM, so they may only come first; a
pipeline without one starts from ``seed_mask(cam, threshold=0.3)``. All names
and parameters are checked when the pipeline is built, and proposal backends
are built then, once per pipeline (SAM loads its checkpoint once).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from postproc.crf import check_crf_params, crf_refine
from postproc.masks import check_cam, check_image, check_range
from postproc.proposals import ProposalBackend, build_proposals, check_backend_params
from postproc.regions import FUSION_MODES, check_selection_params, refine_with_proposals
from postproc.threshold import DEFAULT_THRESHOLD, seed_mask
from training.errors import ConfigError
from training.registry import Registry

# Backend arguments that do not change the masks (or are objects) stay out of keys.
_KEY_SKIPPED = frozenset({"device", "points_per_batch"})


def _keyword_params(function: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _format_value(name: str, value: Any) -> str:
    if name == "checkpoint" and isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.fspath(value))  # keys must not depend on the machine
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (float, np.floating)):  # 12 and 12.0 name the same setting
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, np.integer, str)):
        return str(value)
    return getattr(value, "__name__", type(value).__name__)


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step as configured.

    Attributes:
        name: a name in :data:`STEPS`.
        params: keyword arguments of the step (``proposal_params`` nested for ``regions``).
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
        params = {k: v for k, v in entry.items() if k != "step"}
        return cls(name=entry["step"], params=params)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, **self.params}

    @property
    def key(self) -> str:
        """Stable short name, e.g. ``crf(scale=12)``: explicit parameters, sorted."""
        parts = []
        for name in sorted(self.params):
            value = self.params[name]
            if isinstance(value, Mapping):
                prefix = self.params.get("backend", "superpixel")
                parts += [f"{prefix}.{k}={_format_value(k, value[k])}" for k in sorted(value) if k not in _KEY_SKIPPED]
            else:
                parts.append(f"{name}={_format_value(name, value)}")
        return f"{self.name}({','.join(parts)})"


class BackendCache:
    """Builds each distinct proposal backend once per pipeline."""

    def __init__(self) -> None:
        self._built: dict[tuple, ProposalBackend] = {}

    def get(self, name: str, params: Mapping[str, Any]) -> ProposalBackend:
        # Objects (a ready SAM model) are told apart by identity, values by value.
        key = (
            name,
            tuple(
                sorted((k, v if isinstance(v, (str, int, float, os.PathLike)) else id(v)) for k, v in params.items())
            ),
        )
        if key not in self._built:
            self._built[key] = build_proposals(name, **params)
        return self._built[key]


STEPS: Registry[type] = Registry("refinement step")


class Step:
    """Base of pipeline steps: ``step(image, cam, mask) -> H×W bool``."""

    starts_from_cam: ClassVar[bool] = False

    @classmethod
    def param_names(cls) -> list[str]:
        raise NotImplementedError

    @classmethod
    def build(cls, params: dict[str, Any], backends: BackendCache) -> Step:
        return cls(**params)

    def __call__(self, image: np.ndarray, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@STEPS.register("threshold")
class ThresholdStep(Step):
    """cam → seed mask; ignores the current mask."""

    starts_from_cam = True

    def __init__(self, **params: Any) -> None:
        check_range("threshold", params.get("threshold", DEFAULT_THRESHOLD), low=0.0, high=1.0)
        self.params = params

    @classmethod
    def param_names(cls) -> list[str]:
        return _keyword_params(seed_mask)

    def __call__(self, image: np.ndarray, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return seed_mask(cam, **self.params)


@STEPS.register("crf")
class CrfStep(Step):
    """image, cam → dense-CRF mask; ignores the current mask."""

    starts_from_cam = True

    def __init__(self, **params: Any) -> None:
        check_crf_params(**params)
        self.params = params

    @classmethod
    def param_names(cls) -> list[str]:
        return _keyword_params(crf_refine)

    def __call__(self, image: np.ndarray, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return crf_refine(image, cam, **self.params)


@STEPS.register("regions")
class RegionsStep(Step):
    """image, current mask → mask refined by region proposals.

    Parameters: ``backend`` (a name in ``PROPOSAL_BACKENDS``, default
    ``superpixel``), ``proposal_params`` (that backend's keyword arguments), and
    the keyword arguments of :func:`postproc.regions.refine_with_proposals`.
    """

    def __init__(self, proposals: ProposalBackend, **params: Any) -> None:
        self.check(params)
        self.proposals = proposals
        self.params = params

    @staticmethod
    def check(params: Mapping[str, Any]) -> None:
        """Validate the selection and fusion parameters (not the backend's)."""
        check_selection_params(**{k: v for k, v in params.items() if k != "fusion"})
        FUSION_MODES.check(params.get("fusion", "copy"), field="fusion")

    @classmethod
    def param_names(cls) -> list[str]:
        return ["backend", "proposal_params", *_keyword_params(refine_with_proposals)]

    @classmethod
    def build(cls, params: dict[str, Any], backends: BackendCache) -> Step:
        params = dict(params)
        backend = params.pop("backend", "superpixel")
        proposal_params = params.pop("proposal_params", None) or {}
        if not isinstance(proposal_params, Mapping):
            raise ConfigError(f"proposal_params: expected a mapping of {backend} arguments, got {proposal_params!r}")
        check_backend_params(backend, proposal_params)
        cls.check(params)  # before a backend such as SAM is loaded
        return cls(backends.get(backend, proposal_params), **params)

    def __call__(self, image: np.ndarray, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return refine_with_proposals(self.proposals.propose(image), mask, **self.params)


class Pipeline:
    """Ordered refinement steps; call it as ``pipeline(image, cam) -> H×W bool``.

    Build with :meth:`from_spec`. ``key`` names the pipeline in outputs and tables.
    """

    def __init__(self, specs: list[StepSpec], steps: list[Step]) -> None:
        self.specs = tuple(specs)
        self.steps = tuple(steps)

    @classmethod
    def from_spec(cls, entries: Iterable[Mapping[str, Any] | StepSpec]) -> Pipeline:
        """Build and validate a pipeline from ``[{"step": name, **params}, ...]``.

        Raises:
            ConfigError: unknown step (valid ones listed), unknown parameter (the
                step's valid ones listed), out-of-range value, or a CAM-based
                step (``threshold``, ``crf``) after the first position.
        """
        if isinstance(entries, (Mapping, str)):
            raise ConfigError(f"pipeline: expected a list of steps, got {entries!r}")
        specs, steps, backends = [], [], BackendCache()
        for index, entry in enumerate(entries):
            where = f"pipeline[{index}]"
            spec = entry if isinstance(entry, StepSpec) else StepSpec.from_dict(entry, where=where)
            step_cls = STEPS.get(spec.name, field=f"{where}.step")
            valid = step_cls.param_names()
            unknown = sorted(set(spec.params) - set(valid))
            if unknown:
                raise ConfigError(
                    f"{where}: step {spec.name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
                )
            if step_cls.starts_from_cam and index > 0:
                raise ConfigError(
                    f"{where}: step {spec.name!r} starts again from the CAM and would "
                    "discard the steps before it; it may only be the first step"
                )
            try:
                steps.append(step_cls.build(dict(spec.params), backends))
            except ConfigError as err:
                raise ConfigError(f"{where} ({spec.name}): {err}") from err
            specs.append(spec)
        return cls(specs, steps)

    @property
    def key(self) -> str:
        """e.g. ``crf(scale=12)+regions(backend=superpixel,fusion=copy)``; ``seed`` if empty."""
        return "+".join(spec.key for spec in self.specs) or "seed"

    def to_spec(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.specs]

    def __call__(self, image: np.ndarray, cam: np.ndarray) -> np.ndarray:
        """Refine one CAM.

        Args:
            image: H×W×3 uint8 RGB.
            cam: H×W float32 in [0, 1], same H×W as ``image``.

        Returns:
            H×W bool pseudo mask.
        """
        cam = check_cam(cam)
        image = check_image(image, shape=cam.shape)
        mask = None
        for step in self.steps:
            if mask is None and not step.starts_from_cam:
                mask = seed_mask(cam, threshold=DEFAULT_THRESHOLD)
            mask = step(image, cam, mask)
        return seed_mask(cam, threshold=DEFAULT_THRESHOLD) if mask is None else mask

    def __repr__(self) -> str:
        return f"Pipeline({self.key})"
