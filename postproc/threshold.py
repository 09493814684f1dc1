"""Seed masks from CAMs by a fixed threshold, and the per-image oracle threshold."""

from __future__ import annotations

import numpy as np

from postproc.masks import check_cam, check_mask, mask_iou
from training.config.parse import check_range
from training.config.refine import ThresholdStep
from training.metrics import DEFAULT_THRESHOLDS

DEFAULT_THRESHOLD = ThresholdStep.threshold  # the seed of a pipeline that starts without a CAM step


def seed_mask(cam: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Binarise a CAM: a pixel is smoke when its activation is ≥ ``threshold``.

    Args:
        cam: H×W float32 in [0, 1].
        threshold: activation at or above which a pixel is foreground, in [0, 1].

    Returns:
        H×W bool seed mask.
    """
    ThresholdStep(threshold=threshold)  # raises ConfigError unless a number in [0, 1]
    return check_cam(cam) >= threshold


def oracle_threshold(
    cam: np.ndarray,
    gt: np.ndarray,
    *,
    thresholds: np.ndarray | list[float] = DEFAULT_THRESHOLDS,
) -> tuple[float, float]:
    """The threshold that maximises this image's IoU with its ground truth.

    An upper bound for reporting (the thesis's "oracle threshold" row); it uses
    the ground truth, so it must never be used to make pseudo masks.

    Args:
        cam: H×W float32 in [0, 1].
        gt: H×W bool ground-truth smoke mask.
        thresholds: candidate thresholds, each in [0, 1]; ties go to the first.

    Returns:
        ``(best_threshold, best_iou)``. An empty prediction against an empty
        ground truth counts as IoU 1.0.
    """
    cam = check_cam(cam)
    gt = check_mask(gt, shape=cam.shape, name="gt")
    candidates = np.asarray(thresholds, dtype=np.float64).ravel()
    if candidates.size == 0:
        raise ValueError("thresholds: expected at least one candidate threshold, got none")
    for t in candidates:
        check_range("thresholds", float(t), low=0.0, high=1.0)
    ious = [mask_iou(cam >= t, gt) for t in candidates]
    best = int(np.argmax(ious))
    return float(candidates[best]), float(ious[best])
