"""VARM, the variation-aware refinement module of Self Correspondence Distillation (Xu et al., AAAI 2023).

PAR's propagation (:mod:`postproc.par`) with the position kernel replaced by a
penalty on neighbours that sit in textured places::

    κ_rgb(k) = −(|I − I_k| / (w_rgb · σ_I))²        (averaged over RGB)
    v(k)     = (I_k − I_k↓)² + (I_k − I_k→)²         (averaged over RGB)
    w_k      = softmax_k(κ_rgb) − w_var · softmax_k(v)

``I_k↓`` and ``I_k→`` are the values one pixel below and to the right of the
neighbour ``I_k`` (the last row / column repeats itself), σ_I the standard
deviation over the 8·D neighbours, and the weights sum to 1 − w_var at every
pixel (``normalize`` removes that uniform gain, see :func:`postproc.neighbours.propagate`).

SCD's ``VARM.py`` writes the colour logits as ``−((|I − I_k| / σ_I) · 4)²``,
i.e. ``w_rgb = 1/4``; its ``w1 = 0.3`` attribute is unused (it is PAR's).
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
    cam_array,
    colour_logits,
    dilated_neighbours,
    image_tensor,
    match_cam_to_image,
    propagate,
)
from training.config.refine import VarmStep, check_varm_params

W_RGB = VarmStep.w_rgb  # SCD multiplies |I − I_k| / σ by 4
W_VAR = VarmStep.w_var  # SCD's w2: weight of the local-variation penalty

__all__ = ["W_RGB", "W_VAR", "check_varm_params", "local_variation", "varm_refine", "varm_refine_np", "varm_weights"]


def local_variation(neighbours: Tensor) -> Tensor:
    """Squared difference of each neighbour value with the pixel below and the one to its right.

    Args:
        neighbours: B×C×N×H×W neighbour maps (:func:`dilated_neighbours` of an image).

    Returns:
        B×1×N×H×W variation, averaged over the C channels; the last row and
        column compare with themselves (zero), as SCD shifts with the edge repeated.
    """
    variation = torch.zeros_like(neighbours)
    torch.sub(neighbours[..., :-1, :], neighbours[..., 1:, :], out=variation[..., :-1, :]).square_()
    right = neighbours[..., :-1] - neighbours[..., 1:]
    variation[..., :-1].addcmul_(right, right)
    return variation.mean(dim=1, keepdim=True)


def varm_weights(
    image: Tensor,
    *,
    dilations: Sequence[int] = DILATIONS,
    w_rgb: float = W_RGB,
    w_var: float = W_VAR,
) -> Tensor:
    """VARM's neighbour weights for each pixel.

    Args:
        image: B×3×H×W float. The colour term ignores any per-channel affine
            scaling, the variation term does not: SCD feeds ``image / 255``.
        dilations, w_rgb, w_var: as :func:`varm_refine`.

    Returns:
        B×1×(8·D)×H×W weights; they sum to ``1 − w_var`` at every pixel.
    """
    neighbours = dilated_neighbours(image, dilations)
    rgb = colour_logits(image, neighbours, temperature=w_rgb)
    return rgb.softmax(dim=2) - w_var * local_variation(neighbours).softmax(dim=2)


def varm_refine(
    image: Tensor,
    cam: Tensor,
    *,
    dilations: Sequence[int] = DILATIONS,
    iters: int = ITERS,
    w_rgb: float = W_RGB,
    w_var: float = W_VAR,
    normalize: bool = False,
) -> Tensor:
    """Refine maps with VARM, as SCD's ``VARM(dilations, num_iter)(image, cam)``.

    Args:
        image: B×3×H×W float in [0, 1] (see :func:`varm_weights`); its H×W sets the output size.
        cam: B×K×h×w float maps; resized to H×W bilinearly (``align_corners=True``) first.
        dilations: neighbourhood radii in pixels.
        iters: propagation steps, ≥ 0.
        w_rgb: colour kernel width in units of the local colour deviation, > 0.
        w_var: weight of the local-variation penalty, in [0, 1).
        normalize: divide the weights by their sum (1 − w_var), so that a
            constant map stays constant; SCD does not.

    Returns:
        B×K×H×W refined maps, ``cam``'s dtype; the inputs are not modified.
    """
    check_varm_params(dilations=dilations, iters=iters, w_rgb=w_rgb, w_var=w_var)
    cam = match_cam_to_image(image, cam)
    weights = varm_weights(image.to(cam.dtype), dilations=dilations, w_rgb=w_rgb, w_var=w_var)
    return propagate(cam, weights, dilations, iters=iters, normalize=normalize)


def varm_refine_np(
    image: np.ndarray,
    cam: np.ndarray,
    *,
    dilations: Sequence[int] = DILATIONS,
    iters: int = ITERS,
    w_rgb: float = W_RGB,
    w_var: float = W_VAR,
) -> np.ndarray:
    """Refine one CAM with VARM (the numpy form of :func:`varm_refine`, normalised weights).

    Args:
        image: H×W×3 uint8 RGB, same H×W as ``cam``.
        cam: H×W float in [0, 1].
        dilations, iters, w_rgb, w_var: as :func:`varm_refine`.

    Returns:
        H×W float32 refined CAM, clipped to [0, 1] (the variation penalty makes a
        few weights slightly negative, so a step is not exactly a convex mix).
    """
    cam = check_cam(cam)
    image = check_image(image, shape=cam.shape)
    refined = varm_refine(
        image_tensor(image),
        torch.from_numpy(cam)[None, None],
        dilations=dilations,
        iters=iters,
        w_rgb=w_rgb,
        w_var=w_var,
        normalize=True,
    )
    return cam_array(refined)
