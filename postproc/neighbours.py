"""Dilated 8-neighbourhoods and the propagation loop shared by PAR and VARM.

Both refinements (PAR: Ru et al., CVPR 2022 / 2023; VARM: Xu et al., AAAI 2023)
replace each pixel of a map by a weighted sum of its 8 neighbours at several
dilations, the weights coming from the image alone, and repeat that a fixed
number of times. They differ only in how the weights are made, so the
neighbourhood, the colour kernel and the loop live here.

Neighbour order, for each dilation ``d`` in turn: the 3×3 ring read row by row,
offsets ``(dy, dx)`` = (−d, −d), (−d, 0), (−d, +d), (0, −d), (0, +d), (+d, −d),
(+d, 0), (+d, +d), the order of the references' one-hot 3×3 convolution kernels.
Borders replicate the edge pixel, as the references' ``F.pad(..., mode='replicate')``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.config.refine import PROPAGATION_DILATIONS, PROPAGATION_ITERS, check_dilations, check_iters

# the defaults of the ``varm`` and ``par`` refinement steps (the schema owns them)
DILATIONS = PROPAGATION_DILATIONS
ITERS = PROPAGATION_ITERS
STD_EPS = 1e-8  # added to the neighbourhood's standard deviation, as the references do

RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

__all__ = ["DILATIONS", "ITERS", "RING", "STD_EPS", "cam_array", "check_dilations", "check_iters", "colour_logits",
           "dilated_neighbours", "image_tensor", "match_cam_to_image", "neighbour_distances", "neighbour_offsets",
           "propagate"]


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offset of each of the 8·D neighbours, in :func:`dilated_neighbours` order."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in RING]


def neighbour_distances(dilations: Sequence[int], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Euclidean distance of each neighbour from the centre: ``d`` on the axes, ``d·√2`` on diagonals.

    Returns:
        (8·D,) tensor.
    """
    return torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)], dtype=dtype)


def dilated_neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """Every pixel's 8 neighbours at each dilation, edges replicated.

    Slices of one padded copy instead of the references' one-hot dilated
    convolution: the same numbers, without a convolution per dilation.

    Args:
        x: B×C×H×W.
        dilations: D neighbourhood radii in pixels.

    Returns:
        B×C×(8·D)×H×W; ``out[:, :, k, i, j] = x[:, :, i + dy_k, j + dx_k]`` with
        coordinates clamped to the image.
    """
    h, w = x.shape[-2:]
    reach = max(dilations)
    padded = F.pad(x, [reach] * 4, mode="replicate")  # also wider than the image: clamped coordinates
    views = [
        padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w] for dy, dx in neighbour_offsets(dilations)
    ]
    return torch.stack(views, dim=2)


def colour_logits(image: Tensor, neighbours: Tensor, *, temperature: float) -> Tensor:
    """Colour-similarity logits of each neighbour: ``−(|I − I_k| / (σ·temperature))²``, averaged over channels.

    ``σ`` is the per-channel standard deviation (unbiased, as ``torch.std``) of
    the 8·D neighbour values around each pixel, so the kernel adapts to local
    contrast and ignores any per-channel affine change of the image.

    Args:
        image: B×C×H×W float.
        neighbours: B×C×(8·D)×H×W, :func:`dilated_neighbours` of ``image``.
        temperature: width of the kernel in units of σ, > 0.

    Returns:
        B×1×(8·D)×H×W logits (≤ 0), to be soft-maxed over dim 2.
    """
    # torch.std over a middle dimension is several times slower on CPU than this; the in-place
    # steps keep it to two neighbourhood-sized temporaries (allocation dominates at this size)
    count = neighbours.shape[2]
    std = (neighbours - neighbours.mean(dim=2, keepdim=True)).square_().sum(dim=2, keepdim=True).div_(count - 1).sqrt_()
    scale = std.add_(STD_EPS).mul_(temperature).square_()
    logits = (neighbours - image.unsqueeze(2)).square_().div_(scale)
    return logits.mean(dim=1, keepdim=True).neg_()


def propagate(
    cam: Tensor, weights: Tensor, dilations: Sequence[int], *, iters: int, normalize: bool = False
) -> Tensor:
    """Iterate ``m ← Σ_k w_k · m(neighbour k)`` ``iters`` times.

    Args:
        cam: B×K×H×W float maps (each channel propagated on its own).
        weights: B×1×(8·D)×H×W neighbour weights (the same for every channel).
        dilations: the D dilations ``weights`` were built for.
        iters: number of steps, ≥ 0 (0 returns a copy of ``cam``).
        normalize: divide the weights by their per-pixel sum first. PAR's weights
            sum to 1 + w_pos and VARM's to 1 − w_var at every pixel, so the
            references' maps grow or shrink by that factor per step; that gain is
            the same for every pixel and channel, so it never changes their
            arg-max labels, but it does move a map against a fixed threshold.

    Returns:
        B×K×H×W maps (a new tensor).
    """
    if normalize:
        weights = weights / weights.sum(dim=2, keepdim=True)
    h, w = cam.shape[-2:]
    reach = max(dilations)
    offsets = neighbour_offsets(dilations)
    per_neighbour = weights.unbind(dim=2)
    out = cam.clone()
    for _ in range(iters):
        # accumulating the 8·D shifted copies is 3-4× faster than stacking them (dilated_neighbours)
        padded = F.pad(out, [reach] * 4, mode="replicate")
        out = torch.zeros_like(cam)
        for (dy, dx), weight in zip(offsets, per_neighbour, strict=True):
            out.addcmul_(padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w], weight)
    return out


def match_cam_to_image(image: Tensor, cam: Tensor) -> Tensor:
    """Check a torch image / CAM pair and resize the CAM to the image (bilinear, ``align_corners=True``,
    as PAR and VARM do before propagating).

    Args:
        image: B×3×H×W float.
        cam: B×K×h×w float, any h×w.

    Returns:
        B×K×H×W cam (``cam`` itself when already at H×W).
    """
    if image.ndim != 4 or cam.ndim != 4:
        raise ValueError(f"image, cam: expected B×C×H×W and B×K×h×w tensors, got shapes {tuple(image.shape)}, "
                         f"{tuple(cam.shape)}")
    if image.shape[0] != cam.shape[0]:
        raise ValueError(f"cam: expected batch {image.shape[0]} to match the image, got {cam.shape[0]}")
    if not (image.is_floating_point() and cam.is_floating_point()):
        raise ValueError(f"image, cam: expected float tensors, got {image.dtype}, {cam.dtype}")
    if cam.shape[-2:] != image.shape[-2:]:
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return cam


def image_tensor(image: np.ndarray) -> Tensor:
    """H×W×3 uint8 RGB → 1×3×H×W float32 in [0, 1] (the references feed ``image / 255``)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def cam_array(refined: Tensor) -> np.ndarray:
    """1×1×H×W refined CAM → H×W float32, clipped to [0, 1].

    Normalised PAR weights are a convex mix and VARM's nearly so (its variation
    penalty makes a few weights slightly negative), so the clip only trims
    excursions of that size.
    """
    return refined[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32, copy=False)
