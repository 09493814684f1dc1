"""SCD's other loss terms: scale equivariance, the balanced segmentation loss, the dense energy loss.

Formulas as SCD's ``scripts/dist_train_voc.py`` and ``utils/losses.py`` compute them;
deviations are marked where they are made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config.scd import SCDConfig

IGNORE_INDEX = 255
ENERGY_WEIGHT = 1e-7  # DenseEnergyLoss(weight=...) in SCD, before the total loss's own 0.01
ENERGY_SIGMA_RGB = SCDConfig.energy_sigma_rgb  # colour deviation of the energy's Gaussian kernel, 0–255 units
ENERGY_SIGMA_XY = SCDConfig.energy_sigma_xy  # its spatial deviation in full-resolution pixels
ENERGY_SCALE = SCDConfig.energy_scale  # the energy is computed on the maps resized by this factor
EXP_FLOOR = 80.0  # kernel entries below e^-80 are taken as e^-80
ENERGY_CHUNK = 1 << 24  # pixel-affinity entries held at once (64 MiB in float32)


def scale_equivariance_loss(cam: Tensor, cam_small: Tensor) -> Tensor:
    """``mean |down(A) − A'|``: the CAM of the image, resized to the small view, against the small view's CAM.

    SCD computes this on ``[:, 1:]`` of CAMs without a background channel, which
    drops its first VOC class (aeroplane), not a background; here every channel
    of foreground-only CAMs is used. SCD's two CAMs come from ``multi_scale_cam``
    under ``torch.no_grad``, so there the term carries no gradient at all; this
    function does not detach, the caller decides.

    Args:
        cam: B×K×H×W foreground CAMs of the image.
        cam_small: B×K×h×w foreground CAMs of the down-scaled image.

    Returns:
        Scalar mean absolute difference at h×w (``cam`` resized bilinearly,
        ``align_corners=True``, as SCD).
    """
    if cam.shape[:2] != cam_small.shape[:2]:
        raise ValueError(f"cam, cam_small: expected the same B×K, got {tuple(cam.shape)}, {tuple(cam_small.shape)}")
    down = F.interpolate(cam, size=cam_small.shape[-2:], mode="bilinear", align_corners=True)
    return (down - cam_small).abs().mean()


def balanced_seg_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(CE over background-labelled pixels + CE over foreground-labelled pixels) / 2``.

    Each half is a mean over its own pixels, so a small object weighs as much as
    the background (SCD's ``get_seg_loss``). Where a half has no pixel, SCD's
    ``F.cross_entropy`` returns NaN; here that half counts 0.

    Args:
        logits: B×(K+1)×H×W segmentation logits (channel 0 = background).
        labels: B×H×W integer labels in {0..K} or ``ignore_index``.
        ignore_index: label of pixels that do not count.

    Returns:
        Scalar loss.
    """
    labels = labels.long()
    valid = labels != ignore_index
    per_pixel = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none")
    halves = []
    for part in (valid & (labels == 0), valid & (labels != 0)):
        count = part.sum()
        halves.append((per_pixel * part).sum() / count.clamp(min=1))
    return 0.5 * (halves[0] + halves[1])


def gaussian_affinity_apply(image: Tensor, values: Tensor, *, sigma_rgb: float, sigma_xy: float,
                            chunk: int = ENERGY_CHUNK) -> Tensor:
    """``(W v)_i = Σ_j exp(−|p_i − p_j|²/2σ_xy² − |c_i − c_j|²/2σ_rgb²) v_j`` over all pixel pairs (i = j included).

    SCD filters with a permutohedral lattice (O(N), approximate, up to a
    constant of the lattice); this is the exact dense sum, O(N²) per image, so
    it suits the small maps the energy is computed on (N = 1,024 at 64 px).

    Args:
        image: B×3×H×W RGB in 0–255.
        values: B×K×H×W.
        sigma_rgb: colour deviation, 0–255 units.
        sigma_xy: spatial deviation in pixels of this grid.
        chunk: kernel entries (B × rows × N) built at once.

    Returns:
        B×K×H×W filtered values.
    """
    b, k, h, w = values.shape
    n = h * w
    yy, xx = torch.meshgrid(torch.arange(h, dtype=values.dtype, device=values.device),
                            torch.arange(w, dtype=values.dtype, device=values.device), indexing="ij")
    pos = torch.stack([xx.flatten(), yy.flatten()], dim=1) / sigma_xy  # N×2
    colour = image.to(values.dtype).flatten(2).transpose(1, 2) / sigma_rgb  # B×N×3
    feats = torch.cat([pos.expand(b, n, 2), colour], dim=2)  # B×N×5
    v = values.flatten(2).transpose(1, 2)  # B×N×K
    rows = max(1, chunk // (b * n))
    parts = []
    for start in range(0, n, rows):
        kernel = torch.cdist(feats[:, start : start + rows], feats)
        # in place (the kernel is the memory); the clamp keeps exp out of float32's denormal range
        # (e^-80 ≈ 2e-35), where x86 CPUs run many times slower, at no visible cost to the sum
        parts.append(kernel.square_().clamp_(max=2 * EXP_FLOOR).mul_(-0.5).exp_() @ v)
    return torch.cat(parts, dim=1).transpose(1, 2).reshape(b, k, h, w)


class _DenseEnergy(torch.autograd.Function):
    """``−Σ S · gate · W S / B`` with SCD's hand-written gradient ``−2 · gate · W S / B``.

    That gradient treats the gate as a constant and the gated kernel as if it
    were symmetric (it is not where the gate varies); it is kept because the
    0.01 weight of the term was tuned with it.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, filtered: Tensor) -> Tensor:
        ctx.save_for_backward(filtered)
        return -(probs * filtered).sum() / probs.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (filtered,) = ctx.saved_tensors
        return -2.0 * grad * filtered / filtered.shape[0], None


def energy_loss(
    image: Tensor,
    logits: Tensor,
    labels: Tensor,
    *,
    weight: float = ENERGY_WEIGHT,
    sigma_rgb: float = ENERGY_SIGMA_RGB,
    sigma_xy: float = ENERGY_SIGMA_XY,
    scale: float = ENERGY_SCALE,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The gated dense-CRF energy loss of SCD (``DenseEnergyLoss``, from 1-Stage / Tang et al. 2018).

    With ``S = softmax(logits)`` resized by ``scale``::

        gate_i = 1 at ignored pixels, else 1 − max_k S_ik
        L      = −weight · Σ_{i,k} S_ik · gate_i · Σ_j W_ij S_jk / B

    i.e. the CRF's pairwise term ``S_kᵀ W (1 − S_k)`` without its constant,
    where the label is ignored or the head is unsure. SCD's crop-box mask (it
    zeroes padding from random crops) is not taken: our images have no padding.

    Args:
        image: B×3×H×W RGB in 0–255 (SCD de-normalises before this loss).
        logits: B×(K+1)×H×W segmentation logits at the image size.
        labels: B×H×W pseudo labels, ``ignore_index`` where unsure.
        weight: the energy's own factor (SCD: 1e-7).
        sigma_rgb: colour deviation of the kernel, 0–255 units.
        sigma_xy: spatial deviation in full-resolution pixels (scaled with the maps).
        scale: factor of the resize before the energy (images and labels nearest,
            probabilities bilinear, as SCD).
        ignore_index: the pseudo labels' "unsure" value.

    Returns:
        Scalar loss (negative; lower means neighbours of similar colour agree more).
    """
    probs = F.interpolate(logits.softmax(dim=1), scale_factor=scale, mode="bilinear", align_corners=False)
    small_image = F.interpolate(image.float(), scale_factor=scale, mode="nearest")
    small_labels = F.interpolate(labels[:, None].float(), scale_factor=scale, mode="nearest")[:, 0]
    with torch.no_grad():
        gate = (1.0 - probs.max(dim=1).values).clamp(min=0)
        gate = torch.where(small_labels == ignore_index, torch.ones_like(gate), gate)
        filtered = gaussian_affinity_apply(small_image, probs.detach(), sigma_rgb=sigma_rgb,
                                           sigma_xy=sigma_xy * scale) * gate[:, None]
    return weight * _DenseEnergy.apply(probs, filtered)
