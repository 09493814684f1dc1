"""Dense CRF refinement of a CAM (fully connected CRF, Krähenbühl & Koltun 2011).

Uses the ``pydensecrf`` module, installed from the ``pydensecrf2`` package. The
defaults and ranges of the parameters are those of `training.config.refine.CrfStep`.
"""

from __future__ import annotations

import numpy as np

from postproc.masks import check_cam, check_image
from training.config.refine import CrfStep

UNARY_CLIP = 1e-5


def crf_unary(cam: np.ndarray, *, alpha: float = CrfStep.alpha) -> np.ndarray:
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
    alpha: float = CrfStep.alpha,
    scale: float = CrfStep.scale,
    iters: int = CrfStep.iters,
    gauss_sxy: float = CrfStep.gauss_sxy,
    gauss_compat: float = CrfStep.gauss_compat,
    bilateral_sxy: float = CrfStep.bilateral_sxy,
    bilateral_srgb: float = CrfStep.bilateral_srgb,
    bilateral_compat: float = CrfStep.bilateral_compat,
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

    CrfStep(  # raises ConfigError naming an out-of-range parameter
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
