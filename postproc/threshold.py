"""Seed masks from CAMs by a fixed threshold.

The per-image oracle threshold, an upper bound that reads the ground truth, is a
metric (`training.metrics.oracle_miou`), never a refinement step.
"""

from __future__ import annotations

import numpy as np

from postproc.masks import check_cam
from training.config.refine import ThresholdStep

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
