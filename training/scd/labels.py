"""Pseudo labels for SCD's segmentation head: VARM-refined CAMs at two background scores.

As SCD's ``refine_cams_with_bkg_v2`` (``utils/camutils.py``): a constant
background channel is put in front of the foreground CAMs, once at the high
and once at the low background score; each stack is soft-maxed over channels,
refined (VARM on the half-size image) and arg-maxed. A pixel is

- foreground class k where class k wins even against the high background score,
- background where the background wins even at the low score,
- ``ignore`` in between (the band where the CAM is neither clearly on nor off).

For our one-class smoke CAM this is the reference's construction, not
``1 − cam``: the background is the constant score, so without refinement a pixel
is smoke iff cam > high, background iff cam ≤ low, ignored otherwise. With one
class the two-channel stacks are refined as their difference (`_one_class`): the
same labels, half the propagation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from postproc.varm import varm_refine
from training.config.scd import SCDConfig, check_bg_scores
from training.errors import ConfigError

BG_HIGH = SCDConfig.bg_high  # SCD's --high_thre
BG_LOW = SCDConfig.bg_low  # SCD's --low_thre
DOWN_SCALE = SCDConfig.label_down_scale  # VARM runs on the image and CAMs at 1/2 size
IGNORE_INDEX = 255

Refine = Callable[[Tensor, Tensor], Tensor]


def pseudo_labels(
    image: Tensor,
    cam: Tensor,
    *,
    high: float = BG_HIGH,
    low: float = BG_LOW,
    present: Tensor | None = None,
    refine: Refine | None = varm_refine,
    down_scale: int = DOWN_SCALE,
    size: tuple[int, int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Pseudo labels with an ignore band from foreground CAMs.

    Args:
        image: B×3×H×W float in [0, 1] (SCD feeds VARM the de-normalised image / 255).
        cam: B×K×H×W foreground CAMs in [0, 1] at the image size, no background channel.
        high: the background score that foreground must beat to be labelled.
        low: the background score below which a pixel is labelled background.
        present: B×K bool image labels; a class absent from an image is never
            its label (SCD keeps only the image's classes). None: all present.
        refine: ``refine(image, probs) → probs`` on B×C×h×w maps, linear in the maps and
            each channel on its own (VARM by default, PAR too); None labels the unrefined
            probabilities at full size.
        down_scale: ``refine`` works on the image and maps resized to
            (H // down_scale, W // down_scale), bilinearly; the result is resized to ``size``.
        size: the labels' h×w; None: the CAM's H×W (SCD's). The refined probabilities
            are resized to it (bilinearly) before the arg-max, so a size equal to the
            refinement's skips that resize.
        ignore_index: the label of the band between the two scores.

    Returns:
        B×h×w int64 labels (h×w = ``size``): 0 background, k ∈ 1..K class k, ``ignore_index``.
    """
    check_bg_scores(high, low)
    b, k, h, w = cam.shape
    bad_scale = isinstance(down_scale, bool) or not isinstance(down_scale, int) or not 1 <= down_scale <= min(h, w)
    if refine is not None and bad_scale:
        raise ConfigError(f"down_scale: expected an integer in [1, {min(h, w)}] (the CAM's side), got {down_scale!r}")
    if image.shape[0] != b or image.shape[-2:] != (h, w):
        raise ValueError(f"cam: expected B×K×H×W matching image {tuple(image.shape)}, got {tuple(cam.shape)}")
    if present is not None and present.shape != (b, k):
        raise ValueError(f"present: expected B×K = {(b, k)} image labels, got {tuple(present.shape)}")
    size = tuple(size) if size is not None else (h, w)
    if refine is not None:
        # resizing is linear and keeps constants, so the CAM is resized before the stacks are built
        small = (h // down_scale, w // down_scale)
        cam = F.interpolate(cam, size=small, mode="bilinear", align_corners=False)
        image = F.interpolate(image, size=small, mode="bilinear", align_corners=False)
    if k == 1:
        return _one_class(image, cam, high, low, present, refine, size, ignore_index)
    stacks = torch.cat([_with_background(cam, high), _with_background(cam, low)], dim=1)  # B×2(K+1)×h×w
    if present is not None:
        background = torch.ones(b, 1, dtype=torch.bool, device=present.device)
        keep = torch.cat([background, present.bool()], dim=1).repeat(1, 2)
        stacks = stacks.masked_fill(~keep[:, :, None, None], float("-inf"))
    probs = torch.cat([part.softmax(dim=1) for part in stacks.split(k + 1, dim=1)], dim=1)
    if refine is not None:
        probs = refine(image, probs)
    if probs.shape[-2:] != size:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    # max(dim=1).indices, not argmax(dim=1): the same first-maximum rule, 20× faster on CPU over
    # a short channel dimension; ties go to the background (first) channel
    label_high, label_low = (part.max(dim=1).indices for part in probs.split(k + 1, dim=1))
    ignore = torch.full_like(label_high, ignore_index)
    return torch.where(label_high > 0, label_high, torch.where(label_low == 0, torch.zeros_like(ignore), ignore))


def _one_class(image: Tensor, cam: Tensor, high: float, low: float, present: Tensor | None, refine: Refine | None,
               size: tuple[int, int], ignore_index: int) -> Tensor:
    """`pseudo_labels` for one class, refining one map per background score instead of two.

    With two channels the arg-max of ``[R(p_bg), R(p_fg)]`` is "smoke iff R(p_fg − p_bg) > 0"
    for any linear ``R`` (the refinement, then the bilinear resize), and ``p_fg − p_bg`` of the
    soft-max of ``[score, cam]`` is ``tanh((cam − score) / 2)``: the same labels for half the
    propagation (ties, a difference of exactly 0, go to the background as there).
    """
    margins = torch.cat([torch.tanh((cam - high) / 2), torch.tanh((cam - low) / 2)], dim=1)  # B×2×h×w
    if present is not None:  # an absent class has p_fg = 0, p_bg = 1
        margins = torch.where(present.bool()[:, :, None, None], margins, torch.full_like(margins, -1.0))
    if refine is not None:
        margins = refine(image, margins)
    if margins.shape[-2:] != size:
        margins = F.interpolate(margins, size=size, mode="bilinear", align_corners=False)
    smoke_high, background_low = margins[:, 0] > 0, margins[:, 1] <= 0
    labels = torch.full(smoke_high.shape, ignore_index, dtype=torch.long, device=cam.device)
    return labels.masked_fill_(background_low, 0).masked_fill_(smoke_high, 1)


def _with_background(cam: Tensor, score: float) -> Tensor:
    return torch.cat([torch.full_like(cam[:, :1], score), cam], dim=1)
