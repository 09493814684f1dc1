"""Correspondence distillation: the CAMs' pairwise agreement taught to the segmentation head.

Between two views of an image (the image and its down-scaled copy), P×P random
points are sampled in each. The feature correspondence of the CAM vectors,
``F_ij = ⟨â_i, â'_j⟩`` (L2-normalised over channels, no gradient), is the target
of the segmentation correspondence ``C_ij = ⟨ŝ_i, ŝ'_j⟩`` of the head's logits::

    F ← F − mean_j F_ij + mean_{b,i,j} F        (each row centred, the global mean put back)
    L = mean_{b,i,j} −max(C_ij, 0) · F_ij

the contrastive correlation loss of STEGO (Hamilton et al., ICLR 2022) with its
shift b = 0, as SCD's ``utils/corrloss.py`` computes it. Pairs whose features
agree more than their row's average pull the head's codes together; the clamp
stops pushing codes apart once they are orthogonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.errors import ConfigError

POINTS = 40  # P: P×P points per view (SCD's feature_samples)
NORM_EPS = 1e-10  # SCD's F.normalize eps


def correspondence_features(cam: Tensor) -> Tensor:
    """The CAM vectors whose correspondence is the target.

    SCD uses the 20 VOC class CAMs as they are. A single smoke CAM would make a
    1-vector, whose L2-normalised value is 1 wherever the CAM is positive, so
    every pair would correspond; a ``1 − cam`` background channel (the
    complement the CRF unary also uses) makes ``⟨â_i, â'_j⟩`` compare activations.

    Args:
        cam: B×K×H×W CAMs in [0, 1].

    Returns:
        B×2×H×W ``[1 − cam, cam]`` when K = 1, else ``cam`` itself.
    """
    return torch.cat([1.0 - cam, cam], dim=1) if cam.shape[1] == 1 else cam


def random_points(batch: int, *, points: int = POINTS, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """Uniform random sampling coordinates in [−1, 1]² (``grid_sample``'s (x, y) convention).

    Returns:
        B×P×P×2 float32.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ConfigError(f"points: expected an integer ≥ 1 (P×P points per view), got {points!r}")
    coords = torch.rand(batch, points, points, 2, generator=generator, device=getattr(generator, "device", "cpu"))
    return (coords * 2 - 1).to(device)


def sample_at(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``maps`` at normalised coordinates (``align_corners=True``: ±1 are the
    centres of the corner pixels; outside the border repeats).

    Args:
        maps: B×C×H×W.
        coords: B×P×Q×2 (x, y) in [−1, 1].

    Returns:
        B×C×(P·Q) sampled vectors.
    """
    # SCD transposes the two point axes before sampling, which only renumbers the points
    sampled = F.grid_sample(maps, coords.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.flatten(2)


@torch.no_grad()
def feature_correspondence(feats: Tensor, feats_small: Tensor) -> Tensor:
    """``F`` of the module docstring, from point vectors, without gradient.

    Args:
        feats: B×C×N vectors of view 1.
        feats_small: B×C×M vectors of view 2.

    Returns:
        B×N×M row-centred correspondence plus the batch's global mean.
    """
    fd = F.normalize(feats, dim=1, eps=NORM_EPS).transpose(1, 2) @ F.normalize(feats_small, dim=1, eps=NORM_EPS)
    # mean of the row-centred map is 0 up to rounding; SCD subtracts it anyway, this does not
    return fd - fd.mean(dim=2, keepdim=True) + fd.mean()


def correspondence_loss_at(feats: Tensor, feats_small: Tensor, codes: Tensor, codes_small: Tensor) -> Tensor:
    """The correspondence loss on already sampled points.

    Args:
        feats: B×Cf×N CAM vectors of view 1 (no gradient flows into them).
        feats_small: B×Cf×M CAM vectors of view 2.
        codes: B×Cs×N segmentation logits of view 1, at the same points.
        codes_small: B×Cs×M segmentation logits of view 2.

    Returns:
        Scalar ``mean −max(C, 0) · F`` over the batch and all N×M pairs.
    """
    target = feature_correspondence(feats, feats_small)
    cd = F.normalize(codes, dim=1, eps=NORM_EPS).transpose(1, 2) @ F.normalize(codes_small, dim=1, eps=NORM_EPS)
    return -(cd.clamp(min=0) * target).mean()


def correspondence_loss(
    feats: Tensor,
    feats_small: Tensor,
    codes: Tensor,
    codes_small: Tensor,
    *,
    points: int = POINTS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SCD's correspondence-distillation loss between two views.

    SCD passes the multi-scale CAMs at image size and at the small view's size,
    and the head's logits resized (bilinearly, ``align_corners=True``) to those
    same sizes; any sizes work here, the points are in normalised coordinates.

    Args:
        feats: B×Cf×H×W CAM features of the image (:func:`correspondence_features`).
        feats_small: B×Cf×h×w CAM features of the down-scaled image.
        codes: B×Cs×H'×W' segmentation logits of the image.
        codes_small: B×Cs×h'×w' segmentation logits of the down-scaled image.
        points: P, the side of the P×P point grid sampled in each view.
        generator: the source of the random points, for determinism.

    Returns:
        Scalar loss; its gradient reaches ``codes`` and ``codes_small`` only. The
        memory is B·P⁴ floats per intermediate (P = 40, B = 32: 330 MB each).
    """
    b = feats.shape[0]
    if not (feats_small.shape[0] == codes.shape[0] == codes_small.shape[0] == b):
        raise ValueError("feats, feats_small, codes, codes_small: expected the same batch size, got "
                         f"{[t.shape[0] for t in (feats, feats_small, codes, codes_small)]}")
    coords = random_points(b, points=points, generator=generator, device=codes.device)
    coords_small = random_points(b, points=points, generator=generator, device=codes.device)
    return correspondence_loss_at(
        sample_at(feats.detach(), coords),
        sample_at(feats_small.detach(), coords_small),
        sample_at(codes, coords),
        sample_at(codes_small, coords_small),
    )
