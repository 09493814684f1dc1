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
is smoke iff cam > high, background iff cam ≤ low, ignored otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from postproc.varm import varm_refine
from training.errors import ConfigError

BG_HIGH = 0.55  # SCD's --high_thre
BG_LOW = 0.35  # SCD's --low_thre
DOWN_SCALE = 2  # VARM runs on the image and CAMs at 1/2 size
IGNORE_INDEX = 255

Refine = Callable[[Tensor, Tensor], Tensor]


def check_bg_scores(high: float, low: float) -> None:
    """Raise ConfigError unless 0 ≤ low ≤ high ≤ 1."""
    if not (isinstance(high, (int, float)) and isinstance(low, (int, float)) and 0.0 <= low <= high <= 1.0):
        raise ConfigError(f"bg_low, bg_high: expected 0 ≤ bg_low ≤ bg_high ≤ 1, got bg_low={low!r}, bg_high={high!r}")


def pseudo_labels(
    image: Tensor,
    cam: Tensor,
    *,
    high: float = BG_HIGH,
    low: float = BG_LOW,
    present: Tensor | None = None,
    refine: Refine | None = varm_refine,
    down_scale: int = DOWN_SCALE,
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
        refine: ``refine(image, probs) → probs`` on B×C×h×w maps (VARM by
            default); None labels the unrefined probabilities at full size.
        down_scale: ``refine`` works on the image and maps resized to
            (H // down_scale, W // down_scale), bilinearly; the result is resized back.
        ignore_index: the label of the band between the two scores.

    Returns:
        B×H×W int64 labels: 0 background, k ∈ 1..K class k, ``ignore_index``.
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
    stacks = torch.cat([_with_background(cam, high), _with_background(cam, low)], dim=1)  # B×2(K+1)×H×W
    if refine is not None:
        small = (h // down_scale, w // down_scale)
        stacks = F.interpolate(stacks, size=small, mode="bilinear", align_corners=False)
        image = F.interpolate(image, size=small, mode="bilinear", align_corners=False)
    if present is not None:
        background = torch.ones(b, 1, dtype=torch.bool, device=present.device)
        keep = torch.cat([background, present.bool()], dim=1).repeat(1, 2)
        stacks = stacks.masked_fill(~keep[:, :, None, None], float("-inf"))
    probs = torch.cat([part.softmax(dim=1) for part in stacks.split(k + 1, dim=1)], dim=1)
    if refine is not None:
        probs = F.interpolate(refine(image, probs), size=(h, w), mode="bilinear", align_corners=False)
    # max(dim=1).indices, not argmax(dim=1): the same first-maximum rule, 20× faster on CPU over
    # a short channel dimension; ties go to the background (first) channel
    label_high, label_low = (part.max(dim=1).indices for part in probs.split(k + 1, dim=1))
    ignore = torch.full_like(label_high, ignore_index)
    return torch.where(label_high > 0, label_high, torch.where(label_low == 0, torch.zeros_like(ignore), ignore))


def _with_background(cam: Tensor, score: float) -> Tensor:
    return torch.cat([torch.full_like(cam[:, :1], score), cam], dim=1)
