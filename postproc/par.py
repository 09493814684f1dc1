"""PAR, pixel-adaptive refinement (Ru et al., AFA, CVPR 2022; reused by ToCo, CVPR 2023).

A CAM is propagated over dilated 8-neighbourhoods (:mod:`postproc.neighbours`)
with weights from the image::

    κ_rgb(k) = −(|I − I_k| / (w_rgb · σ_I))²        (averaged over RGB)
    κ_pos(k) = −(|P − P_k| / (pos_temperature · σ_P))²
    w_k      = softmax_k(κ_rgb) + w_pos · softmax_k(κ_pos)

σ_I and σ_P are the standard deviations over the 8·D neighbours (of the colours
around each pixel, and of the neighbour distances d, d√2). The references use
one ``w1 = 0.3`` for both temperatures and ``w2 = 0.01`` for ``w_pos``.

As written in the references the weights sum to 1 + w_pos, so ten steps scale a
map by 1.01¹⁰ ≈ 1.105; they only arg-max the result over classes, which that
uniform gain does not change (``normalize`` removes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from postproc.masks import check_cam, check_image
from postproc.neighbours import (
    DILATIONS,
    ITERS,
    STD_EPS,
    cam_array,
    colour_logits,
    dilated_neighbours,
    image_tensor,
    match_cam_to_image,
    neighbour_distances,
    propagate,
)
from training.config.refine import ParStep, check_par_params

W_RGB = ParStep.w_rgb  # w1 in AFA: colour kernel width, in units of the local colour deviation
W_POS = ParStep.w_pos  # w2 in AFA: weight of the position kernel
POS_TEMPERATURE = ParStep.pos_temperature  # the references reuse w1 for the position kernel

__all__ = ["POS_TEMPERATURE", "W_POS", "W_RGB", "check_par_params", "par_refine", "par_refine_np", "par_weights"]


def par_weights(
    image: Tensor,
    *,
    dilations: Sequence[int] = DILATIONS,
    w_rgb: float = W_RGB,
    w_pos: float = W_POS,
    pos_temperature: float = POS_TEMPERATURE,
) -> Tensor:
    """PAR's neighbour weights for each pixel.

    Args:
        image: B×3×H×W float (any per-channel affine scaling: 0–1, 0–255 or normalised).
        dilations, w_rgb, w_pos, pos_temperature: as :func:`par_refine`.

    Returns:
        B×1×(8·D)×H×W weights; they sum to ``1 + w_pos`` at every pixel.
    """
    rgb = colour_logits(image, dilated_neighbours(image, dilations), temperature=w_rgb)
    dist = neighbour_distances(dilations, dtype=image.dtype).to(image.device)
    # unbiased std over the 8·D distances, as torch.std in the references
    pos = -(dist / (dist.std() + STD_EPS) / pos_temperature) ** 2
    return rgb.softmax(dim=2) + w_pos * pos.softmax(dim=0).view(1, 1, -1, 1, 1)


def par_refine(
    image: Tensor,
    cam: Tensor,
    *,
    dilations: Sequence[int] = DILATIONS,
    iters: int = ITERS,
    w_rgb: float = W_RGB,
    w_pos: float = W_POS,
    pos_temperature: float = POS_TEMPERATURE,
    normalize: bool = False,
) -> Tensor:
    """Refine maps with PAR, as the references' ``PAR(dilations, num_iter)(image, cam)``.

    Args:
        image: B×3×H×W float; its H×W sets the output size.
        cam: B×K×h×w float maps (CAMs, or class probabilities with a background
            channel); resized to H×W bilinearly (``align_corners=True``) first.
        dilations: neighbourhood radii in pixels.
        iters: propagation steps, ≥ 0.
        w_rgb: colour kernel width in units of the local colour deviation (w1), > 0.
        w_pos: weight of the position kernel (w2), ≥ 0.
        pos_temperature: position kernel width in units of the distance deviation, > 0.
        normalize: divide the weights by their sum (1 + w_pos), so that a
            constant map stays constant; the references do not.

    Returns:
        B×K×H×W refined maps, ``cam``'s dtype; the inputs are not modified.
    """
    check_par_params(dilations=dilations, iters=iters, w_rgb=w_rgb, w_pos=w_pos, pos_temperature=pos_temperature)
    cam = match_cam_to_image(image, cam)
    weights = par_weights(image.to(cam.dtype), dilations=dilations, w_rgb=w_rgb, w_pos=w_pos,
                          pos_temperature=pos_temperature)
    return propagate(cam, weights, dilations, iters=iters, normalize=normalize)


def par_refine_np(
    image: np.ndarray,
    cam: np.ndarray,
    *,
    dilations: Sequence[int] = DILATIONS,
    iters: int = ITERS,
    w_rgb: float = W_RGB,
    w_pos: float = W_POS,
    pos_temperature: float = POS_TEMPERATURE,
) -> np.ndarray:
    """Refine one CAM with PAR (the numpy form of :func:`par_refine`, like ``crf_refine``).

    The weights are normalised (``normalize=True``) so that the result is again a
    CAM in [0, 1] that thresholds the way its input did; propagation is linear,
    so refining the CAM alone equals refining it next to a ``1 − cam`` background.

    Args:
        image: H×W×3 uint8 RGB, same H×W as ``cam``.
        cam: H×W float in [0, 1].
        dilations, iters, w_rgb, w_pos, pos_temperature: as :func:`par_refine`.

    Returns:
        H×W float32 refined CAM in [0, 1].
    """
    cam = check_cam(cam)
    image = check_image(image, shape=cam.shape)
    refined = par_refine(
        image_tensor(image),
        torch.from_numpy(cam)[None, None],
        dilations=dilations,
        iters=iters,
        w_rgb=w_rgb,
        w_pos=w_pos,
        pos_temperature=pos_temperature,
        normalize=True,
    )
    return cam_array(refined)

