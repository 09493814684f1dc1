"""Dense CRF refinement of a CAM (fully connected CRF, Krähenbühl & Koltun 2011).

Uses the ``pydensecrf`` module, installed from the ``pydensecrf2`` package.
"""

from __future__ import annotations

import numpy as np

from postproc.masks import check_cam, check_image, check_range
from training.errors import ConfigError

UNARY_CLIP = 1e-5


def check_crf_params(
    *,
    alpha: float = 1.0,
    scale: float = 12.0,
    iters: int = 10,
    gauss_sxy: float = 3.0,
    gauss_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> None:
    """Raise ConfigError for any out-of-range :func:`crf_refine` parameter."""
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ConfigError(f"iters: expected an integer ≥ 1 (mean-field iterations), got {iters!r}")
    check_range("alpha", alpha, low=0.0, low_open=True)
    check_range("scale", scale, low=0.0, low_open=True)
    for name, value in (("gauss_sxy", gauss_sxy), ("bilateral_sxy", bilateral_sxy), ("bilateral_srgb", bilateral_srgb)):
        check_range(name, value, low=0.0, low_open=True)
    check_range("gauss_compat", gauss_compat, low=0.0)
    check_range("bilateral_compat", bilateral_compat, low=0.0)


def crf_unary(cam: np.ndarray, *, alpha: float = 1.0) -> np.ndarray:
    """Two-label unary energies from a CAM.

    Background probability is ``(1 − cam)^alpha`` and foreground ``cam``; both
    are clipped to [1e-5, 1] and normalised per pixel before the negative log.

    Args:
        cam: H×W float32 in [0, 1].
        alpha: exponent on the background probability; > 1 favours foreground.

    Returns:
        2×(H·W) float32 C-contiguous unary energies (label 0 = background).
    """
    from pydensecrf.utils import unary_from_softmax

    cam = check_cam(cam)
    probs = np.stack([(1.0 - cam) ** alpha, cam]).astype(np.float32)
    probs = np.clip(probs, UNARY_CLIP, 1.0)
    probs /= probs.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(unary_from_softmax(probs, clip=UNARY_CLIP))


def crf_refine(
    image: np.ndarray,
    cam: np.ndarray,
    *,
    alpha: float = 1.0,
    scale: float = 12.0,
    iters: int = 10,
    gauss_sxy: float = 3.0,
    gauss_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """Refine a CAM into a binary mask with a two-label dense CRF.

    The thesis's "scale factor" divides both spatial deviations, so a larger
    ``scale`` makes the pairwise kernels more local (12–16 was best, 2 collapsed).

    Args:
        image: H×W×3 uint8 RGB, same H×W as ``cam``; made C-contiguous here.
        cam: H×W float32 in [0, 1].
        alpha: exponent on the background probability ``(1 − cam)^alpha``, > 0.
        scale: divisor of ``gauss_sxy`` and ``bilateral_sxy``, > 0.
        iters: mean-field iterations, ≥ 1.
        gauss_sxy: spatial deviation of the smoothness kernel, in pixels before scaling.
        gauss_compat: weight of the smoothness kernel (Potts compatibility), ≥ 0.
        bilateral_sxy: spatial deviation of the appearance kernel, before scaling.
        bilateral_srgb: colour deviation of the appearance kernel, in 0–255 units.
        bilateral_compat: weight of the appearance kernel, ≥ 0.

    Returns:
        H×W bool mask, True where the foreground label wins.
    """
    import pydensecrf.densecrf as dcrf

    check_crf_params(
        alpha=alpha,
        scale=scale,
        iters=iters,
        gauss_sxy=gauss_sxy,
        gauss_compat=gauss_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    cam = check_cam(cam)
    image = check_image(image, shape=cam.shape)
    height, width = cam.shape

    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(crf_unary(cam, alpha=alpha))
    crf.addPairwiseGaussian(sxy=gauss_sxy / scale, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy / scale, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    q = np.asarray(crf.inference(int(iters)), dtype=np.float32).reshape(2, height, width)
    return q.argmax(axis=0) == 1
