"""Class activation maps: classifier-weight CAM, Grad-CAM, multi-scale, layer fusion.

All functions are batched over images; the only Python loop runs over scales
(a handful), so extraction stays GPU-friendly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from training.config import CamConfig, names
from training.errors import ConfigError
from training.models import Backbone, pcm_refine
from training.registry import Registry

CamFn = Callable[[Backbone, torch.Tensor, tuple[int, ...]], torch.Tensor]
CAM_METHODS: Registry[CamFn] = Registry("CAM method", names=names.CAM_METHODS)


def build_cam_method(name: str) -> CamFn:
    """The CAM function named ``name`` (``cam.method``), resolved once per extraction."""
    return CAM_METHODS.get(name, field="cam.method")


NORMALISERS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry(
    "CAM normalisation", names=names.CAM_NORMALISATIONS
)


@NORMALISERS.register("max")
def normalise(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image max normalisation of a B×h×w non-negative CAM into [0, 1]."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(eps)
    return cam / peak[:, None, None]


@NORMALISERS.register("minmax")
def minmax_normalise(cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image ``(cam − min) / (max − min + eps)`` of a B×h×w non-negative CAM, as the
    thesis's ``pseudo_label.py`` computes it after the ReLU: a CAM without a zero is
    stretched to start at 0, where the max normalisation would leave it lifted."""
    flat = cam.flatten(1)
    low, high = flat.amin(dim=1)[:, None, None], flat.amax(dim=1)[:, None, None]
    return (cam - low) / (high - low + eps)


@CAM_METHODS.register("weight")
def weight_cam(net: Backbone, images: torch.Tensor, layers: tuple[int, ...] = ()) -> torch.Tensor:
    """``relu(Σ_c w_c · F_c)`` for the smoke class; with several ``layers``, each
    block's CAM is normalised, the CAMs averaged and normalised again (layer fusion).

    Args:
        net: the classifier; its head must be avg pool + linear (see models.py).
        images: B×3×H×W normalised images.
        layers: block indices to fuse (ViT), or () for the last feature map.
    Returns:
        B×h×w non-negative CAM at feature resolution.
    """
    fmaps = net.block_maps(images, layers) if layers else [net.feature_map(images)]
    return weight_cam_from_maps(net, fmaps)


def weight_cam_from_maps(net: Backbone, fmaps: list[torch.Tensor]) -> torch.Tensor:
    """The classifier-weight CAM of already computed B×C×h×w feature maps (fused when several)."""
    w = net.classifier.weight[0]
    cams = [F.relu(torch.einsum("bchw,c->bhw", f, w.to(f.dtype))) for f in fmaps]
    if net.pcm:
        cams = [pcm_refine(c, f) for c, f in zip(cams, fmaps, strict=True)]
    if len(cams) == 1:
        return cams[0]
    return normalise(torch.stack([normalise(c) for c in cams]).mean(dim=0))


@CAM_METHODS.register("gradcam")
def grad_cam(net: Backbone, images: torch.Tensor, layers: tuple[int, ...] = ()) -> torch.Tensor:
    """Grad-CAM of the smoke logit. ViT: at the last block's first LayerNorm (the
    thesis's choice); CNN: at the last feature map, where it equals the weight CAM
    up to scale because the head is linear.

    Returns:
        B×h×w non-negative CAM.
    """
    if layers:
        raise ConfigError("cam.layers: layer fusion is only implemented for method 'weight'")
    with torch.enable_grad():
        if not net.is_vit:
            fmap = net.feature_map(images).detach().requires_grad_(True)
            acts, (grads,) = fmap, torch.autograd.grad(net.logits_from(fmap).sum(), fmap)
        else:
            acts, grads = _vit_norm1_grads(net, images)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * acts).sum(dim=1)).detach()


def _vit_norm1_grads(net: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and gradients (both B×D×h×w) at ``blocks[-1].norm1``."""
    from training.models import tokens_to_map

    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["tokens"] = output

    handle = net.net.blocks[-1].norm1.register_forward_hook(keep)
    try:
        logits, _ = net(images.detach().requires_grad_(True))
        logits.sum().backward()
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)
    tokens = captured["tokens"]
    to_map = lambda t: tokens_to_map(t, net.net.num_prefix_tokens, images.shape[-2:], net.patch)
    return to_map(tokens.detach()), to_map(tokens.grad)


def scaled_size(size: int, scale: float, multiple: int) -> int:
    """Side of a rescaled input, rounded to a multiple of the patch (ViT) size."""
    return max(multiple, round(size * scale / multiple) * multiple)


def multiscale_cams(
    net: Backbone, images: torch.Tensor, cfg: CamConfig, *, method: CamFn | None = None
) -> torch.Tensor:
    """Multi-scale CAM: at each scale the CAM is resized back, normalised to [0,1]
    (``cam.normalise``), and the scales are averaged without renormalising, as the
    thesis's ``pseudo_label.py`` does (its scales 0.5, 1, 1.5, 2).

    Args:
        net: the network whose CAMs are wanted, in eval mode.
        images: B×3×H×W normalised images.
        cfg: method, scales and fusion layers.
        method: ``build_cam_method(cfg.method)`` when already resolved.
    Returns:
        B×H×W float32 CAM in [0, 1].
    """
    return multiscale_cams_and_logits(net, images, cfg, method=method)[0]


def multiscale_cams_and_logits(
    net: Backbone, images: torch.Tensor, cfg: CamConfig, *, method: CamFn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`multiscale_cams` plus the B×K logits at the input size.

    For the weight CAM of the last feature map, the logits come from the same
    forward pass as the scale-1 CAM (``logits = linear(mean(F))``), which saves
    one full forward per batch: half the work of a single-scale evaluation.

    Returns:
        (B×H×W float32 CAM in [0, 1], B×K logits).
    """
    method = method or build_cam_method(cfg.method)
    norm = NORMALISERS.get(cfg.normalise, field="cam.normalise")
    shared = method is weight_cam and not cfg.layers  # the built-in weight CAM can share its forward
    h, w = images.shape[-2:]
    multiple = net.patch[0] if net.is_vit else 1
    total = torch.zeros(images.shape[0], h, w, device=images.device)
    logits = None
    for scale in cfg.scales:
        size = (scaled_size(h, scale, multiple), scaled_size(w, scale, multiple))
        if shared and size == (h, w) and logits is None:
            fmap = net.feature_map(images)
            logits = net.logits_from(fmap)
            cam = weight_cam_from_maps(net, [fmap]).float()
        else:
            x = images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False)
            cam = method(net, x, tuple(cfg.layers)).float()
        cam = F.interpolate(cam[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
        total += norm(F.relu(cam))  # resized, then normalised per scale, then averaged: the thesis's order
    if logits is None:
        logits = net(images)[0]
    return total / len(cfg.scales), logits
