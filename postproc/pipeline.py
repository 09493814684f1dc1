"""Refinement pipelines: an ordered list of named steps from CAM + image to a mask.

A pipeline is written as a list of dicts, each naming a step and its fields
(YAML)::

    - {step: crf, scale: 12}
    - {step: regions, backend: sam, rule: iou, fusion: copy,
       proposal_params: {checkpoint: sam_vit_b_01ec64.pth, points_per_side: 32}}

What a step may say (names, fields, defaults, ranges) is the schema's,
`training.config.refine`; here each step name has a *builder* in
:data:`STEP_BUILDERS` that turns the validated step into a function
``(image, cam, mask) -> mask``:

- ``threshold``: cam → seed mask (:func:`postproc.threshold.seed_mask`).
- ``crf``: image, cam → mask (:func:`postproc.crf.crf_refine`).
- ``varm``, ``par``: image, cam → the CAM refined by neighbourhood propagation
  (:func:`postproc.varm.varm_refine_np`, :func:`postproc.par.par_refine_np`); the
  steps after them read the refined CAM.
- ``regions``: image, current mask → mask fused with region proposals
  (:func:`postproc.regions.refine_with_proposals`, proposals from
  :func:`postproc.proposals.build_proposals`).

``threshold``, ``crf``, ``varm`` and ``par`` start from the CAM, so they come first
(``varm`` and ``par`` may be followed by another CAM step: ``varm`` then ``crf``
refines the VARM-refined CAM); a pipeline whose last CAM step is a propagation, or
that has none, starts its masks from ``seed_mask(cam, threshold)`` at the trial's
``cam.threshold``. Building
(:func:`build_pipeline`) validates every step and builds each proposal backend
once per pipeline (SAM loads its checkpoint once).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from postproc.crf import crf_refine
from postproc.masks import check_cam, check_image
from postproc.par import par_refine_np
from postproc.proposals import ProposalBackend, build_proposals
from postproc.regions import refine_with_proposals
from postproc.threshold import DEFAULT_THRESHOLD, seed_mask
from postproc.varm import varm_refine_np
from training.config.parse import shallow_fields
from training.config.refine import (
    SEED_KEY,
    STEPS,
    CrfStep,
    ParStep,
    RegionsStep,
    StepSpec,
    ThresholdStep,
    VarmStep,
    parse_pipeline,
)
from training.errors import ConfigError
from training.registry import Registry

# a step: (image, cam, mask so far, the seed threshold) → mask (a CAM refinement: → the refined CAM)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None, float], np.ndarray]

__all__ = ["STEPS", "STEP_BUILDERS", "BackendCache", "Pipeline", "StepSpec", "build_pipeline"]


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


STEP_BUILDERS: Registry[Callable[[Any, BackendCache], StepFn]] = Registry("refinement step", names=STEPS)


@STEP_BUILDERS.register("threshold")
def _threshold(step: ThresholdStep, backends: BackendCache) -> StepFn:
    return lambda image, cam, mask, seed: seed_mask(cam, threshold=step.threshold)


@STEP_BUILDERS.register("crf")
def _crf(step: CrfStep, backends: BackendCache) -> StepFn:
    params = shallow_fields(step)
    if step.fg_threshold is not None:
        return lambda image, cam, mask, seed: crf_refine(image, cam, **params)
    # the thesis decides at the CAM's own threshold: the trial's, as the seed's
    return lambda image, cam, mask, seed: crf_refine(image, cam, **(params | {"fg_threshold": seed}))


@STEP_BUILDERS.register("varm")
def _varm(step: VarmStep, backends: BackendCache) -> StepFn:
    params = shallow_fields(step)
    return lambda image, cam, mask, seed: varm_refine_np(image, cam, **params)


@STEP_BUILDERS.register("par")
def _par(step: ParStep, backends: BackendCache) -> StepFn:
    params = shallow_fields(step)
    return lambda image, cam, mask, seed: par_refine_np(image, cam, **params)


@STEP_BUILDERS.register("regions")
def _regions(step: RegionsStep, backends: BackendCache) -> StepFn:
    proposals = backends.get(step.backend, shallow_fields(step.proposals))
    selection = step.selection()
    return lambda image, cam, mask, seed: refine_with_proposals(proposals.propose(image), mask, **selection)


class Pipeline:
    """Ordered refinement steps; call it as ``pipeline(image, cam) -> H×W bool``.

    Build with :func:`build_pipeline` (or :meth:`from_spec`). ``key`` names the
    pipeline in outputs and tables.
    """

    def __init__(self, specs: list[StepSpec], steps: list[Any], functions: list[StepFn]) -> None:
        self.specs = tuple(specs)
        self.steps = tuple(steps)  # the validated step dataclasses
        self._functions = tuple(functions)

    @classmethod
    def from_spec(cls, entries: Iterable[Mapping[str, Any] | StepSpec]) -> Pipeline:
        """Build and validate a pipeline from ``[{"step": name, **params}, ...]``.

        Raises:
            ConfigError: unknown step (valid ones listed), unknown parameter (the
                step's valid ones listed), out-of-range value, or a CAM-based
                step (``threshold``, ``crf``) after the first position.
        """
        parsed = parse_pipeline(entries)
        backends, functions = BackendCache(), []
        for index, (spec, step) in enumerate(parsed):
            try:
                functions.append(STEP_BUILDERS.get(spec.name)(step, backends))
            except ConfigError as err:
                raise ConfigError(f"pipeline[{index}] ({spec.name}): {err}") from err
        return cls([spec for spec, _ in parsed], [step for _, step in parsed], functions)

    @property
    def key(self) -> str:
        """e.g. ``crf(scale=12)+regions(backend=superpixel,fusion=copy)``; ``seed`` if empty."""
        return "+".join(spec.key for spec in self.specs) or SEED_KEY

    def to_spec(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.specs]

    def __call__(self, image: np.ndarray, cam: np.ndarray, *, seed_threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """Refine one CAM.

        Args:
            image: H×W×3 uint8 RGB.
            cam: H×W float32 in [0, 1], same H×W as ``image``.
            seed_threshold: the trial's ``cam.threshold``: the seed mask of a pipeline that
                starts without a CAM step, and the CRF's decision threshold unless set.

        Returns:
            H×W bool pseudo mask.
        """
        cam = check_cam(cam)
        image = check_image(image, shape=cam.shape)
        mask = None
        for step, function in zip(self.steps, self._functions, strict=True):
            if getattr(step, "refines_cam", False):  # varm, par: only before any mask (parse_pipeline)
                cam = function(image, cam, mask, seed_threshold)
                continue
            if mask is None and not step.starts_from_cam:
                mask = seed_mask(cam, threshold=seed_threshold)
            mask = function(image, cam, mask, seed_threshold)
        return seed_mask(cam, threshold=seed_threshold) if mask is None else mask

    def __repr__(self) -> str:
        return f"Pipeline({self.key})"


def build_pipeline(entries: Iterable[Mapping[str, Any] | StepSpec]) -> Pipeline:
    """The pipeline of a spec, every step validated and its backends built (the build layer's entry)."""
    return Pipeline.from_spec(entries)
