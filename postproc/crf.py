"""Dense CRF refinement of a CAM (fully connected CRF, Krähenbühl & Koltun 2011).

Uses the ``pydensecrf`` module, installed from the ``pydensecrf2`` package. A
*recipe* (`training.config.refine.CRF_RECIPES`) gives the unary's exponent, the two
kernels, the iterations and the decision rule; any of them can be set explicitly.
``thesis`` is what the thesis's ``post_processing/CRF.py`` computes; ``psa`` the
psa/IRN kernels with the argmax. The defaults and ranges are those of
`training.config.refine.CrfStep`, which owns them.
"""

from __future__ import annotations

import numpy as np

from postproc.masks import check_cam, check_image
from training.config.refine import CRF_RECIPES, CrfStep
from training.config.refine import ThresholdStep as _Seed

UNARY_CLIP = 1e-5  # pydensecrf's own default for unary_from_softmax


def crf_unary(cam: np.ndarray, *, alpha: float = CRF_RECIPES.get(CrfStep.recipe).alpha) -> np.ndarray:
    """Two-label unary energies from a CAM, as the thesis builds them.

    ``p = [(1 − cam)^alpha, cam]`` normalised per pixel (``+1e-8``), then
    ``unary_from_softmax``, which clips at 1e-5 before the negative log.

    Args:
        cam: H×W float32 in [0, 1].
        alpha: exponent on the background probability; > 1 favours foreground.

    Returns:
        2×(H·W) float32 C-contiguous unary energies (label 0 = background).
    """
    from pydensecrf.utils import unary_from_softmax

    cam = check_cam(cam)
    probs = np.stack([(1.0 - cam) ** alpha, cam]).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True) + 1e-8
    return np.ascontiguousarray(unary_from_softmax(probs, clip=UNARY_CLIP))


def crf_refine(
    image: np.ndarray,
    cam: np.ndarray,
    *,
    recipe: str = CrfStep.recipe,
    scale: float = CrfStep.scale,
    alpha: float | None = None,
    iters: int | None = None,
    gauss_sxy: float | None = None,
    gauss_compat: float | None = None,
    bilateral_sxy: float | None = None,
    bilateral_srgb: float | None = None,
    bilateral_compat: float | None = None,
    decision: str | None = None,
    fg_threshold: float | None = None,
) -> np.ndarray:
    """Refine a CAM into a binary mask with a two-label dense CRF.

    The thesis's "scale factor" divides both spatial deviations, so a larger
    ``scale`` makes the pairwise kernels more local (12–16 was best, 2 collapsed).

    Args:
        image: H×W×3 uint8 RGB, same H×W as ``cam``; made C-contiguous here.
        cam: H×W float32 in [0, 1].
        recipe: ``thesis`` or ``psa``; gives every parameter below left at None.
        scale: divisor of ``gauss_sxy`` and ``bilateral_sxy``, > 0.
        alpha: exponent on the background probability ``(1 − cam)^alpha``, > 0.
        iters: mean-field iterations, ≥ 1.
        gauss_sxy: spatial deviation of the smoothness kernel, in pixels before scaling.
        gauss_compat: weight of the smoothness kernel (Potts compatibility), ≥ 0.
        bilateral_sxy: spatial deviation of the appearance kernel, before scaling.
        bilateral_srgb: colour deviation of the appearance kernel, in 0–255 units.
        bilateral_compat: weight of the appearance kernel, ≥ 0.
        decision: ``threshold`` (foreground probability ≥ ``fg_threshold``) or ``argmax``.
        fg_threshold: the decision threshold; None = the seed threshold (0.3, the thesis's).

    Returns:
        H×W bool mask.
    """
    import pydensecrf.densecrf as dcrf

    step = CrfStep(  # raises ConfigError naming an out-of-range parameter
        recipe=recipe, scale=scale, alpha=alpha, iters=iters, gauss_sxy=gauss_sxy, gauss_compat=gauss_compat,
        bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb, bilateral_compat=bilateral_compat,
        decision=decision, fg_threshold=fg_threshold,
    )  # fmt: skip
    p = step.resolved()
    cam = check_cam(cam)
    image = check_image(image, shape=cam.shape)
    height, width = cam.shape

    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(crf_unary(cam, alpha=p["alpha"]))
    crf.addPairwiseGaussian(sxy=p["gauss_sxy"] / scale, compat=p["gauss_compat"])
    crf.addPairwiseBilateral(sxy=p["bilateral_sxy"] / scale, srgb=p["bilateral_srgb"], rgbim=image,
                             compat=p["bilateral_compat"])  # fmt: skip
    q = np.asarray(crf.inference(int(p["iters"])), dtype=np.float32).reshape(2, height, width)
    if p["decision"] == "argmax":
        return q.argmax(axis=0) == 1
    return q[1] >= np.float32(_Seed.threshold if fg_threshold is None else fg_threshold)
