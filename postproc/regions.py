"""Select region proposals (SAM or superpixel masks) with a seed mask and fuse them.

Two selection rules are registered in :data:`SELECTION_RULES`:

- ``iou`` (the thesis's SAM-enhanced masks): keep a proposal whose IoU with the
  seed is ≥ ``iou_threshold``.
- ``majority`` (SAM-enhanced pseudo labels, Chen et al. 2023): keep a proposal
  when more than ``inside_fraction`` of it lies inside the seed, or when it
  covers ≥ ``coverage`` of the seed.

Both first drop proposals covering more than ``max_area`` of the image. Fusion
modes (:data:`FUSION_MODES`): ``and``, ``or`` and ``copy``. ``copy`` means "the
selected regions, with the seed kept where no proposal lies", and "where no
proposal lies" is read per rule exactly as the method describes it:

- ``iou``: for the image as a whole: when no proposal was kept the seed is
  returned unchanged, otherwise the regions alone.
- ``majority``: per pixel: the seed survives at pixels covered by no proposal
  that passed the area filter; covered pixels take the proposals' verdict.

The defaults and ranges of every parameter are those of
`training.config.refine.RegionsStep`, the ``regions`` step of a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from postproc.masks import check_mask, mask_iou
from training.config import names
from training.config.parse import check_range
from training.config.refine import RegionsStep, check_selection
from training.registry import Registry


@dataclass(frozen=True)
class SelectionRule:
    """A way to decide whether one proposal belongs to the foreground.

    Attributes:
        keep: ``keep(proposal, seed, **params) -> bool`` for H×W bool arrays.
        seed_kept_per_pixel: True when ``copy`` fusion keeps the seed at pixels
            covered by no proposal; False when it keeps the seed only if no
            proposal was kept at all.
    """

    keep: Callable[..., bool]
    seed_kept_per_pixel: bool


SELECTION_RULES: Registry[SelectionRule] = Registry("region selection rule", names=names.SELECTION_RULES)
FUSION_MODES: Registry[Callable[..., np.ndarray]] = Registry("fusion mode", names=names.FUSION_MODES)
_D = RegionsStep  # the one owner of the defaults below


def _keep_by_iou(proposal: np.ndarray, seed: np.ndarray, *, iou_threshold: float, **_: float) -> bool:
    return mask_iou(proposal, seed, empty=0.0) >= iou_threshold


def _keep_by_majority(
    proposal: np.ndarray, seed: np.ndarray, *, inside_fraction: float, coverage: float, **_: float
) -> bool:
    overlap = np.logical_and(proposal, seed).sum()
    area, seed_area = proposal.sum(), seed.sum()
    inside = overlap / area if area else 0.0
    covers = overlap / seed_area if seed_area else 0.0
    return bool(inside > inside_fraction or covers >= coverage)


SELECTION_RULES.register("iou")(SelectionRule(_keep_by_iou, seed_kept_per_pixel=False))
SELECTION_RULES.register("majority")(SelectionRule(_keep_by_majority, seed_kept_per_pixel=True))


def _check_masks(masks: Sequence[np.ndarray], seed: np.ndarray) -> tuple[list, np.ndarray]:
    seed = check_mask(seed, name="seed")
    checked = [check_mask(m, shape=seed.shape, name=f"masks[{i}]") for i, m in enumerate(masks)]
    return checked, seed


def candidate_masks(masks: Sequence[np.ndarray], *, max_area: float = _D.max_area) -> list[np.ndarray]:
    """Proposals that cover at most ``max_area`` of the image.

    Args:
        masks: proposals, each H×W bool.
        max_area: largest allowed fraction of the image, in [0, 1].

    Returns:
        The surviving proposals, in input order.
    """
    check_range("max_area", max_area, low=0.0, high=1.0)
    return [m for m in masks if m.mean() <= max_area]


def select_regions(
    masks: Sequence[np.ndarray],
    seed: np.ndarray,
    *,
    rule: str = _D.rule,
    iou_threshold: float = _D.iou_threshold,
    max_area: float = _D.max_area,
    inside_fraction: float = _D.inside_fraction,
    coverage: float = _D.coverage,
) -> np.ndarray:
    """Union of the proposals that the selection ``rule`` assigns to the seed.

    Args:
        masks: proposals, each H×W bool (0/1 integers accepted); not modified.
        seed: H×W bool seed mask (thresholded CAM or CRF output); not modified.
        rule: name in :data:`SELECTION_RULES` (``iou`` or ``majority``).
        iou_threshold: ``iou`` rule: smallest IoU with the seed to keep a proposal.
        max_area: proposals covering more than this fraction of the image are dropped.
        inside_fraction: ``majority`` rule: keep when more than this fraction of
            the proposal lies inside the seed.
        coverage: ``majority`` rule: keep when the proposal covers at least this
            fraction of the seed.

    Returns:
        H×W bool union of the kept proposals (all False when none was kept).
    """
    check_selection(rule, iou_threshold, max_area, inside_fraction, coverage)
    masks, seed = _check_masks(masks, seed)
    keep = SELECTION_RULES.get(rule, field="rule").keep
    regions = np.zeros(seed.shape, dtype=bool)
    for proposal in candidate_masks(masks, max_area=max_area):
        if keep(proposal, seed, iou_threshold=iou_threshold, inside_fraction=inside_fraction, coverage=coverage):
            regions |= proposal
    return regions


@FUSION_MODES.register("and")
def _fuse_and(seed: np.ndarray, regions: np.ndarray, uncovered: np.ndarray | None) -> np.ndarray:
    return seed & regions


@FUSION_MODES.register("or")
def _fuse_or(seed: np.ndarray, regions: np.ndarray, uncovered: np.ndarray | None) -> np.ndarray:
    return seed | regions


@FUSION_MODES.register("copy")
def _fuse_copy(seed: np.ndarray, regions: np.ndarray, uncovered: np.ndarray | None) -> np.ndarray:
    if uncovered is None:
        return regions.copy() if regions.any() else seed.copy()
    return regions | (seed & uncovered)


def fuse(
    seed: np.ndarray,
    regions: np.ndarray,
    *,
    mode: str = _D.fusion,
    uncovered: np.ndarray | None = None,
) -> np.ndarray:
    """Combine the seed with the selected regions.

    Args:
        seed: H×W bool seed mask; not modified.
        regions: H×W bool union of the kept proposals (from :func:`select_regions`).
        mode: name in :data:`FUSION_MODES`: ``and`` (seed ∩ regions), ``or``
            (seed ∪ regions) or ``copy`` (regions, seed where no proposal lies).
        uncovered: H×W bool pixels covered by no candidate proposal. Given (the
            ``majority`` rule), ``copy`` keeps the seed at exactly these pixels;
            None (the ``iou`` rule), ``copy`` returns the seed only when
            ``regions`` is empty. Ignored by ``and`` and ``or``.

    Returns:
        H×W bool fused mask (a new array).
    """
    fusion = FUSION_MODES.get(mode, field="fusion")
    seed = check_mask(seed, name="seed")
    regions = check_mask(regions, shape=seed.shape, name="regions")
    if uncovered is not None:
        uncovered = check_mask(uncovered, shape=seed.shape, name="uncovered")
    return fusion(seed, regions, uncovered)


def refine_with_proposals(
    masks: Sequence[np.ndarray],
    seed: np.ndarray,
    *,
    rule: str = _D.rule,
    fusion: str = _D.fusion,
    iou_threshold: float = _D.iou_threshold,
    max_area: float = _D.max_area,
    inside_fraction: float = _D.inside_fraction,
    coverage: float = _D.coverage,
) -> np.ndarray:
    """Select proposals with ``rule`` and fuse them with the seed by ``fusion``.

    The rule decides how ``copy`` reads "where no proposal lies" (see the module
    docstring). Arguments are those of :func:`select_regions` and :func:`fuse`.

    Returns:
        H×W bool refined mask.
    """
    FUSION_MODES.check(fusion, field="fusion")
    regions = select_regions(
        masks,
        seed,
        rule=rule,
        iou_threshold=iou_threshold,
        max_area=max_area,
        inside_fraction=inside_fraction,
        coverage=coverage,
    )
    uncovered = None
    if SELECTION_RULES.get(rule, field="rule").seed_kept_per_pixel:
        covered = np.zeros(regions.shape, dtype=bool)
        for proposal in candidate_masks(_check_masks(masks, seed)[0], max_area=max_area):
            covered |= proposal
        uncovered = ~covered
    return fuse(seed, regions, mode=fusion, uncovered=uncovered)
