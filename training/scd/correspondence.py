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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config.scd import SCDConfig
from training.errors import ConfigError

POINTS = SCDConfig.points  # P: P×P points per view (SCD's feature_samples)
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


def unit_vectors(x: Tensor) -> Tensor:
    """``x / max(‖x‖₂, 1e-10)`` over dim 1, as ``F.normalize`` (whose norm over a short middle
    dimension is many times slower on CPU than this sum)."""
    # clamping before the root keeps the gradient of a zero vector finite (0), as F.normalize's
    return x / x.square().sum(dim=1, keepdim=True).clamp_min(NORM_EPS**2).sqrt()


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


def _centring(feats: Tensor, feats_small: Tensor) -> Tensor:
    """B×N offsets ``o_i`` with ``F_ij = ⟨â_i, â'_j⟩ + o_i``: minus the row mean, plus the global mean.

    No N×M matrix is needed: the row means are ``⟨â_i, mean_j â'_j⟩`` and the
    global mean is their mean.
    """
    row_means = torch.einsum("bcn,bc->bn", feats, feats_small.mean(dim=2))
    return row_means.mean() - row_means


def _two_class_correlation(codes: Tensor, codes_small: Tensor, feats: Tensor, feats_small: Tensor) -> Tensor:
    """The loss for 2-channel codes (background, smoke) in O((N + M) log M) instead of O(N·M).

    A 2-vector ŝ_i has an angle θ_i; ``⟨ŝ_i, ŝ'_j⟩ > 0`` exactly for the ŝ'_j whose
    angle lies within π/2 of θ_i, a contiguous run once the ŝ'_j are sorted by
    angle. Then::

        Σ_j max(⟨ŝ_i, ŝ'_j⟩, 0) · F_ij = ŝ_iᵀ Σ_{j in run i} ŝ'_j (⟨â'_j, â_i⟩ + o_i)

        = ŝ_iᵀ · R_i · [â_i; o_i],   R_i = Σ_{j in run i} ŝ'_j [â'_j; 1]ᵀ

    and every R_i is a difference of two prefix sums. Autograd differentiates
    this exactly (the runs are constant where the loss is differentiable).
    """
    b, n, m = codes.shape[0], codes.shape[2], codes_small.shape[2]
    offset = _centring(feats, feats_small)
    angle_small = torch.atan2(codes_small[:, 1], codes_small[:, 0]).detach()  # B×M in [−π, π]
    order = angle_small.argsort(dim=1)
    sorted_angle = angle_small.gather(1, order)
    # a zero code (max(C, 0) = 0 with everything) has an angle all the same; masking its terms keeps
    # its gradient 0, as in the plain formula
    live, live_small = (codes.abs().sum(dim=1) > 0).to(codes.dtype), (codes_small.abs().sum(dim=1) > 0).to(codes.dtype)
    with_one = torch.cat([feats_small, feats_small.new_ones(b, 1, m)], dim=1)  # [â'_j; 1]
    payload = torch.einsum("bsm,bfm->bmsf", codes_small * live_small[:, None], with_one)
    payload = payload.gather(1, order[:, :, None, None].expand_as(payload))
    # the runs wrap around ±π: walk a doubled copy, angles + 2π the second time; float64 prefix sums
    # so that a difference of two long sums keeps its digits
    doubled = torch.cat([payload, payload], dim=1).double()
    prefix = torch.cat([doubled.new_zeros(b, 1, *payload.shape[2:]), doubled.cumsum(dim=1)], dim=1)
    angles = torch.cat([sorted_angle, sorted_angle + 2 * math.pi], dim=1)
    low = torch.atan2(codes[:, 1], codes[:, 0]).detach() - math.pi / 2  # B×N
    low = torch.where(low < -math.pi, low + 2 * math.pi, low)
    start = torch.searchsorted(angles, low.contiguous(), right=True)  # first angle > low
    stop = torch.searchsorted(angles, (low + math.pi).contiguous(), right=False)  # first angle ≥ low + π
    rows = torch.arange(b, device=codes.device)[:, None]
    runs = (prefix[rows, stop] - prefix[rows, start]).to(codes.dtype)  # B×N×2×(Cf+1)
    coeff = torch.cat([feats, offset[:, None]], dim=1) * live[:, None]  # B×(Cf+1)×N
    return -torch.einsum("bsn,bnsf,bfn->", codes, runs, coeff) / (b * n * m)


class _ClampedCorrelation(torch.autograd.Function):
    """``mean_{b,i,j} −max(⟨ŝ_i, ŝ'_j⟩, 0) · F_ij`` and its gradient, one image's N×M block at a time.

    Written out by hand because autograd would keep several B×N×M tensors for
    the backward (B·P⁴ floats each: 330 MB at P = 40, B = 32) and spend most of
    the step allocating them; here each image's block is built, used for the
    loss and for both code gradients, and dropped. Codes with more than two
    channels take this path; two-channel codes take :func:`_two_class_correlation`.
    """

    @staticmethod
    def forward(ctx, codes: Tensor, codes_small: Tensor, feats: Tensor, feats_small: Tensor) -> Tensor:
        b, n, m = codes.shape[0], codes.shape[2], codes_small.shape[2]
        scale = -1.0 / (b * n * m)
        offset = _centring(feats, feats_small)
        grad_codes, grad_small = torch.zeros_like(codes), torch.zeros_like(codes_small)
        total = codes.new_zeros(())
        for i in range(b):
            target = torch.addmm(offset[i, :, None], feats[i].T, feats_small[i])  # N×M F, no gradient
            cd = codes[i].T @ codes_small[i]
            # ∂/∂cd of max(cd, 0) · F is F where cd > 0, and Σ of that times cd is the loss sum:
            # one N×M matrix serves the value and both gradients
            weight = target.masked_fill_(cd <= 0, 0.0)
            total += torch.dot(weight.flatten(), cd.flatten())
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                grad_codes[i] = codes_small[i] @ weight.T
                grad_small[i] = codes[i] @ weight
        ctx.save_for_backward(grad_codes * scale, grad_small * scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_codes, grad_small = ctx.saved_tensors
        return grad * grad_codes, grad * grad_small, None, None


def correspondence_loss_at(feats: Tensor, feats_small: Tensor, codes: Tensor, codes_small: Tensor) -> Tensor:
    """The correspondence loss on already sampled points.

    Args:
        feats: B×Cf×N CAM vectors of view 1 (no gradient flows into them).
        feats_small: B×Cf×M CAM vectors of view 2.
        codes: B×Cs×N segmentation logits of view 1, at the same points.
        codes_small: B×Cs×M segmentation logits of view 2.

    Returns:
        Scalar ``mean −max(C, 0) · F`` over the batch and all N×M pairs, with
        ``F`` row-centred plus the batch's global mean (module docstring).
    """
    with torch.no_grad():
        feats, feats_small = unit_vectors(feats), unit_vectors(feats_small)
    codes, codes_small = unit_vectors(codes), unit_vectors(codes_small)
    feats, feats_small = feats.to(codes.dtype), feats_small.to(codes.dtype)
    if codes.shape[1] == 2:
        return _two_class_correlation(codes, codes_small, feats, feats_small)
    return _ClampedCorrelation.apply(codes, codes_small, feats, feats_small)


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
        Scalar loss; its gradient reaches ``codes`` and ``codes_small`` only. It
        covers all P²×P² point pairs (P = 40: 2.6 M per image), in O(B·P² log P)
        for two-channel codes and O(B·P⁴) otherwise.
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
