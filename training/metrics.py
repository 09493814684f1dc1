"""Evaluation metrics for smoke CAMs and pseudo masks: pure functions returning numbers.

Every function takes lists of numpy arrays at image resolution; sizes may differ
between images. Conventions:

- ``cam``: H×W float in [0, 1]; a pixel is smoke when ``cam >= threshold``,
  compared in the CAM's own dtype so every code path agrees at the boundary.
- ``pred`` / ``gt`` / ``context``: H×W bool (integer 0/1 arrays are accepted).
- ``context``: pixels of the object that co-occurs with smoke (the chimney);
  ``None`` or an all-False mask means the image has no context annotation.

Smoke IoU is evaluated only on images whose ground truth contains smoke, as in
the thesis (only windows with smoke are scored). Two aggregations are offered:
dataset-level (Σ intersection / Σ union, the standard one) and per-image (IoU
per image averaged, the thesis code's). Both go through ``IoUCounter`` so there
is one definition of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from training.errors import UndefinedMetric

# The thresholds searched for the best single threshold and the per-image oracle: 0, 0.01, …, 1,
# as the thesis's `find_best_threshold_iou` (`np.linspace(0, 1, 101)`, smoke where cam >= t).
DEFAULT_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)


def iou_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Smoke intersection and union pixel counts of one image.

    Args:
        pred: H×W bool predicted smoke mask.
        gt: H×W bool ground-truth smoke mask.

    Returns:
        ``(intersection, union)``.
    """
    pred, gt = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    _check_same_shape(pred, gt, "pred", "gt")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def threshold_counts(
    cam: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``iou_counts(cam >= t, gt)`` for every threshold t in one pass over the pixels.

    Args:
        cam: H×W float in [0, 1].
        gt: H×W bool.
        thresholds: T thresholds, strictly increasing.

    Returns:
        ``(intersection, union)``, each a length-T int array.
    """
    cam, gt = _as_cam(cam), _as_mask(gt, "gt")
    _check_same_shape(cam, gt, "cam", "gt")
    # compare in the CAM's dtype, as masks_at does, so both agree at the boundary
    thresholds = _check_thresholds(thresholds).astype(cam.dtype)
    # cam >= thresholds[k]  ⇔  k < (number of thresholds <= cam)
    passed = np.searchsorted(thresholds, cam, side="right")
    n = len(thresholds)
    hits_in_gt = _count_at_least(passed[gt], n)
    hits_outside = _count_at_least(passed[~gt], n)
    return hits_in_gt, np.count_nonzero(gt) + hits_outside


def _count_at_least(passed: np.ndarray, n: int) -> np.ndarray:
    """For k in 0..n−1, how many entries of ``passed`` exceed k."""
    histogram = np.bincount(passed, minlength=n + 1)
    return histogram[::-1].cumsum()[::-1][1:]


@dataclass
class IoUCounter:
    """Accumulates smoke IoU counts over images, possibly across shards.

    Images without smoke in the ground truth are counted in ``n_skipped`` and
    otherwise ignored.

    Attributes:
        intersection: Σ intersection over images with smoke.
        union: Σ union over images with smoke.
        iou_sum: Σ per-image IoU over images with smoke.
        n_images: number of images with smoke.
        n_skipped: number of images without smoke.
    """

    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0
    n_images: int = 0
    n_skipped: int = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one image: ``pred`` and ``gt`` are H×W bool masks."""
        intersection, union = iou_counts(pred, gt)
        self.add_counts(intersection, union, has_smoke=bool(np.any(gt)))

    def add_counts(self, intersection: int, union: int, *, has_smoke: bool) -> None:
        """Count one image from its precomputed ``iou_counts``."""
        if not has_smoke:
            self.n_skipped += 1
            return
        self.intersection += int(intersection)
        self.union += int(union)
        self.iou_sum += intersection / union
        self.n_images += 1

    def merge(self, other: IoUCounter) -> IoUCounter:
        """Return a new counter holding both counters' images."""
        return IoUCounter(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    @property
    def miou(self) -> float:
        """Dataset-level smoke IoU: Σ intersection / Σ union."""
        self._require_images()
        return self.intersection / self.union

    @property
    def miou_per_image(self) -> float:
        """Per-image smoke IoU averaged over images (the thesis's way)."""
        self._require_images()
        return self.iou_sum / self.n_images

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, counts: dict[str, float]) -> IoUCounter:
        return cls(**counts)

    def _require_images(self) -> None:
        if self.n_images == 0:
            raise UndefinedMetric(
                f"no image with smoke in the ground truth ({self.n_skipped} without "
                f"smoke); smoke IoU is undefined"
            )


def count_masks(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> IoUCounter:
    """An ``IoUCounter`` over paired lists of H×W bool masks."""
    _check_same_length(preds=preds, gts=gts)
    counter = IoUCounter()
    for pred, gt in zip(preds, gts, strict=True):
        counter.add(pred, gt)
    return counter


def miou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Dataset-level smoke IoU over images whose gt has smoke.

    Args:
        preds: H×W bool predicted masks.
        gts: H×W bool ground-truth masks, same sizes as ``preds``.

    Raises:
        UndefinedMetric: no gt contains smoke (a ValueError).
        ValueError: the lists do not pair up.
    """
    return count_masks(preds, gts).miou


def miou_per_image(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Per-image smoke IoU averaged over images whose gt has smoke.

    Args:
        preds: H×W bool predicted masks.
        gts: H×W bool ground-truth masks, same sizes as ``preds``.

    Raises:
        UndefinedMetric: no gt contains smoke (a ValueError).
        ValueError: the lists do not pair up.
    """
    return count_masks(preds, gts).miou_per_image


def masks_at(cams: Sequence[np.ndarray], threshold: float) -> list[np.ndarray]:
    """Smoke masks ``cam >= threshold``: H×W float in [0, 1] → H×W bool."""
    return [cam >= cam.dtype.type(threshold) for cam in map(_as_cam, cams)]


def best_threshold(
    cams: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> tuple[float, float]:
    """The single threshold with the best dataset-level smoke IoU.

    Args:
        cams: H×W float in [0, 1].
        gts: H×W bool, same sizes as ``cams``.
        thresholds: candidates; ties go to the lowest.

    Returns:
        ``(threshold, miou at that threshold)``.
    """
    return _best_of(*_threshold_sweep(cams, gts, thresholds)[:2])


def oracle_miou(
    cams: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> float:
    """Per-image IoU at each image's own best threshold, averaged (an upper bound).

    Args:
        cams: H×W float in [0, 1].
        gts: H×W bool, same sizes as ``cams``.
        thresholds: candidates.

    Raises:
        UndefinedMetric: no gt contains smoke (a ValueError).
    """
    return _threshold_sweep(cams, gts, thresholds)[2].miou_per_image


def _threshold_sweep(
    cams: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, list[IoUCounter], IoUCounter]:
    """One pass over the pixels for both threshold searches.

    Returns:
        The checked thresholds, one dataset counter per threshold, and a
        counter holding each image at its own best threshold.
    """
    thresholds = _check_thresholds(thresholds)
    _check_same_length(cams=cams, gts=gts)
    per_threshold, oracle = [IoUCounter() for _ in thresholds], IoUCounter()
    for cam, gt in zip(cams, gts, strict=True):
        intersections, unions = threshold_counts(cam, gt, thresholds)
        has_smoke = bool(np.any(gt))
        for counter, i, u in zip(per_threshold, intersections, unions, strict=True):
            counter.add_counts(i, u, has_smoke=has_smoke)
        best = int(np.argmax(intersections / np.maximum(unions, 1)))
        oracle.add_counts(intersections[best], unions[best], has_smoke=has_smoke)
    return thresholds, per_threshold, oracle


def _best_of(thresholds: np.ndarray, counters: list[IoUCounter]) -> tuple[float, float]:
    """The threshold with the highest dataset IoU (the lowest on ties) and that IoU."""
    scores = [counter.miou for counter in counters]
    best = int(np.argmax(scores))
    return float(thresholds[best]), scores[best]


def context_activation(cams: Sequence[np.ndarray], contexts: Sequence[np.ndarray | None]) -> float:
    """Share of CAM mass on the co-occurring object, averaged over images.

    Per image ``Σ(cam · context) / Σ cam``. Images with no context annotation are
    skipped, and so are images whose CAM sums to 0: they put no mass anywhere,
    so the share is undefined rather than 0.

    Args:
        cams: H×W float in [0, 1].
        contexts: H×W bool or None, same sizes as ``cams``.

    Returns:
        The mean share in [0, 1], or NaN when every image with a context has an
        all-zero CAM (a collapsed model should be scored, not crash the trial).

    Raises:
        UndefinedMetric: no image has a non-empty context mask (a ValueError).
    """
    shares = []
    for cam, context in _with_context(cams, contexts):
        mass = float(cam.sum())
        if mass > 0:
            shares.append(float(cam[context].sum()) / mass)
    return float(np.mean(shares)) if shares else float("nan")


def context_false_positive(
    cams: Sequence[np.ndarray], contexts: Sequence[np.ndarray | None], threshold: float
) -> float:
    """Share of context pixels marked smoke (``cam >= threshold``), averaged over images.

    Args:
        cams: H×W float in [0, 1].
        contexts: H×W bool or None, same sizes as ``cams``; images without a
            non-empty context are skipped.
        threshold: the smoke threshold.

    Raises:
        UndefinedMetric: no image has a non-empty context mask (a ValueError).
    """
    pairs = _with_context(cams, contexts)
    smoke = masks_at([cam for cam, _ in pairs], threshold)
    return float(np.mean([np.mean(mask[context]) for mask, (_, context) in zip(smoke, pairs, strict=True)]))


def _with_context(
    cams: Sequence[np.ndarray], contexts: Sequence[np.ndarray | None]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (cam, context) pairs whose context is non-empty; raises if there are none."""
    _check_same_length(cams=cams, contexts=contexts)
    pairs = []
    for cam, context in zip(cams, contexts, strict=True):
        if context is None or not np.any(context):
            continue
        cam, context = _as_cam(cam), _as_mask(context, "context")
        _check_same_shape(cam, context, "cam", "context")
        pairs.append((cam, context))
    if not pairs:
        raise UndefinedMetric(f"none of the {len(cams)} images has a non-empty context mask")
    return pairs


def _has_context(contexts: Sequence[np.ndarray | None] | None) -> bool:
    """Whether any image has a non-empty context mask."""
    return contexts is not None and any(c is not None and np.any(c) for c in contexts)


def accuracy(logits: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Image-level classification accuracy; logit > 0 means smoke.

    Args:
        logits: N smoke logits (shape N or N×1).
        labels: N bool (or 0/1) smoke labels.
    """
    logits = np.asarray(logits, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    _check_same_length(logits=logits, labels=labels)
    if len(logits) == 0:
        raise UndefinedMetric("accuracy of zero images is undefined")
    return float(np.mean((logits > 0) == labels))


def subset_accuracy(
    logits: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    subsets: Sequence[str],
) -> dict[str, float]:
    """Image-level accuracy within each named subset of the test split.

    The synthetic benchmark's manifest tags every test image "coupled" (smoke
    with its chimney) or "decoupled" (smoke without a chimney, or a chimney
    without smoke); a chimney detector scores well on the first and fails the
    second, so the split shows which of the two a classifier learned.

    Args:
        logits: N smoke logits (shape N or N×1); logit > 0 means smoke.
        labels: N bool (or 0/1) smoke labels.
        subsets: N subset names, e.g. from ``manifest.json``'s ``test`` list.

    Returns:
        ``{"accuracy_<subset>": accuracy}`` for every subset name present, sorted.
    """
    logits = np.asarray(logits, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    subsets = np.asarray(subsets, dtype=str).reshape(-1)
    _check_same_length(logits=logits, labels=labels, subsets=subsets)
    return {
        f"accuracy_{name}": accuracy(logits[subsets == name], labels[subsets == name])
        for name in sorted(set(subsets.tolist()))
    }


def cam_scores(
    cams: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    contexts: Sequence[np.ndarray | None] | None,
    logits: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    threshold: float,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> dict[str, float]:
    """All CAM metrics under flat names, ready to log.

    Args:
        cams: H×W float in [0, 1].
        gts: H×W bool, same sizes as ``cams``.
        contexts: H×W bool or None per image, or None; the ``context_*`` keys
            are omitted when no image has a non-empty context mask.
        logits: N smoke logits.
        labels: N bool smoke labels.
        threshold: the smoke threshold for ``miou``, ``miou_per_image`` and
            ``context_fp``.
        thresholds: candidates for ``best_threshold`` and ``oracle_miou``.

    Returns:
        ``miou``, ``miou_per_image``, ``best_threshold``, ``miou_best_threshold``,
        ``oracle_miou``, ``accuracy`` and, with contexts, ``context_activation``
        and ``context_fp``.
    """
    counter = count_masks(masks_at(cams, threshold), gts)
    thresholds, per_threshold, oracle = _threshold_sweep(cams, gts, thresholds)
    best, miou_best = _best_of(thresholds, per_threshold)
    scores = {
        "miou": counter.miou,
        "miou_per_image": counter.miou_per_image,
        "best_threshold": best,
        "miou_best_threshold": miou_best,
        "oracle_miou": oracle.miou_per_image,
        "accuracy": accuracy(logits, labels),
    }
    if _has_context(contexts):
        scores["context_activation"] = context_activation(cams, contexts)
        scores["context_fp"] = context_false_positive(cams, contexts, threshold)
    return scores


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """H×W bool view of a bool or 0/1 integer mask; floats are rejected."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise ValueError(
        f"{name}: expected an H×W bool mask, got dtype {mask.dtype} "
        f"(threshold CAMs with masks_at first)"
    )


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")


def _check_same_length(**lists: Sequence) -> None:
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lists must pair up one-to-one, got lengths {lengths}")


def _check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.ndim != 1 or len(thresholds) == 0 or np.any(np.diff(thresholds) <= 0):
        raise ValueError(f"thresholds: expected a strictly increasing 1-D list, got {thresholds}")
    return thresholds


def _as_cam(cam: np.ndarray) -> np.ndarray:
    """H×W float view of a CAM; integer CAMs become float64, NaN/inf are rejected."""
    cam = np.asarray(cam)
    if not np.issubdtype(cam.dtype, np.floating):
        cam = cam.astype(np.float64)
    if not np.all(np.isfinite(cam)):
        raise ValueError("cam: contains NaN or infinite values")
    return cam
