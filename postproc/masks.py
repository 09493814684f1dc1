"""Input checks and mask arithmetic shared by the refinement steps.

Array problems (wrong shape, dtype or range) raise ``ValueError`` naming the
argument and what was expected; bad tunables raise ``ConfigError`` from the
step dataclasses of `training.config.refine`, which own their defaults and ranges.
"""

from __future__ import annotations

import numpy as np


def check_cam(cam: np.ndarray, *, name: str = "cam") -> np.ndarray:
    """Validate a class activation map and return it as float32.

    Args:
        cam: H×W float array with values in [0, 1].
        name: argument name quoted in errors.

    Returns:
        H×W float32 array (a new array if a conversion was needed).
    """
    cam = np.asarray(cam)
    if cam.ndim != 2 or min(cam.shape) == 0:
        raise ValueError(f"{name}: expected a non-empty H×W array, got shape {cam.shape}")
    if not np.issubdtype(cam.dtype, np.floating):
        raise ValueError(f"{name}: expected a float array in [0, 1], got dtype {cam.dtype}")
    cam = cam.astype(np.float32, copy=False)
    if not np.isfinite(cam).all():
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    low, high = float(cam.min()), float(cam.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"{name}: expected values in [0, 1], got range [{low:.4g}, {high:.4g}]")
    return cam


def check_image(image: np.ndarray, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate an RGB image and return it C-contiguous.

    Args:
        image: H×W×3 uint8 RGB.
        shape: the (H, W) the image must have, usually the CAM's.

    Returns:
        H×W×3 uint8 C-contiguous array (pydensecrf reads the raw buffer).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an H×W×3 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8 (0-255 RGB), got {image.dtype}")
    if shape is not None and image.shape[:2] != tuple(shape):
        raise ValueError(f"image: expected H×W = {tuple(shape)} to match the CAM, got {image.shape[:2]}")
    return np.ascontiguousarray(image)


def check_mask(mask: np.ndarray, *, shape: tuple[int, int] | None = None, name: str = "mask") -> np.ndarray:
    """Validate a binary mask and return it as bool.

    Args:
        mask: H×W bool (or 0/1 integer) array.
        shape: the (H, W) the mask must have.
        name: argument name quoted in errors.

    Returns:
        H×W bool array (a new array if a conversion was needed).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected an H×W array, got shape {mask.shape}")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name}: expected a bool or 0/1 mask, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray, *, empty: float = 1.0) -> float:
    """Intersection over union of two masks.

    Args:
        a: H×W bool.
        b: H×W bool.
        empty: the value returned when both masks are empty (no union).

    Returns:
        IoU in [0, 1].
    """
    union = np.logical_or(a, b).sum()
    if union == 0:
        return float(empty)
    return float(np.logical_and(a, b).sum() / union)
