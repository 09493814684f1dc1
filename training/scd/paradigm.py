"""The paradigms ``self_correspondence`` and ``scd_with_teacher``: one SCD training step.

On images x (B×3×H×W, normalised) and labels y, with the settings of the trial's
``scd`` section (`training.config.scd.SCDConfig`)::

    x'        = x resized to small_view_side(H, scale, patch)     (bilinear, align_corners=True)
    logits, F = the student on x;  F' on x'                        (one forward each, with gradient)
    A, A'     = minmax(relu(w·F)), minmax(relu(w·F'))              (the weight CAM, with gradient)
    S, S'     = head(blocks of x), head(blocks of x')              (SegFormer-style head, 2 classes)
    T, T'     = the CAM targets, no gradient: A, A' detached (cam_scales [1.0], no flip), else SCD's
                multi-scale CAM with mirror images of x and x'
    labels    = pseudo_labels(rgb(x), T at H×W, VARM, bg_high / bg_low, ignore band)
    L = cls·BCE(logits, y) + seg·CE_balanced(S↑, labels) + energy·L_energy(S↑, labels)
        + corr·L_corr(T, T', S, S') + equivariance·mean|down(A) − A'|   [+ λ·L_transfer]

The SCD terms are off during the warm-up (`SCDConfig.loss_weights`, told the step by
`Paradigm.at_step`); ``scd_with_teacher``'s transfer term is ``teacher_student``'s
(`training.paradigm_base.TransferTerm`) and always on, as in the thesis. The CAM
network (``model.student``) is any backbone whose classifier is linear over its
mean feature map (checked when built); the head reads a ViT's ``head_blocks`` blocks,
a CNN's last map. Evaluation reads the head through :meth:`SelfCorrespondence.segment`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from postproc.varm import varm_refine
from training.config import TrialConfig
from training.config.scd import head_block_indices, small_view_side
from training.models import Backbone, build_net
from training.paradigm_base import Paradigm, TransferTerm, bce, build_frozen_teacher, check_classifier_map
from training.scd.correspondence import correspondence_features, correspondence_loss
from training.scd.head import SegmentationHead
from training.scd.labels import pseudo_labels
from training.scd.losses import balanced_seg_loss, energy_loss, scale_equivariance_loss

CAM_EPS = 1e-5  # SCD's `cam /= max + 1e-5`
SCD_TERMS = ("seg", "energy", "corr", "equivariance")


def scd_cam(net: Backbone, fmap: Tensor) -> Tensor:
    """SCD's CAM of a feature map: ``relu(w·F)`` without the bias, then ``(cam − min) / (max + 1e-5)``
    per image (``cam + maxpool(−cam)``, ``cam / (maxpool(cam) + 1e-5)`` in its camutils).

    Args:
        net: the backbone whose classifier weights are used.
        fmap: B×C×h×w features.

    Returns:
        B×1×h×w in [0, 1), differentiable.
    """
    # an einsum, not a 1×1 convolution: on a CPU several times cheaper over a few dozen positions
    cam = F.relu(torch.einsum("bchw,kc->bkhw", fmap, net.classifier.weight.to(fmap.dtype)))
    cam = cam - cam.amin(dim=(2, 3), keepdim=True)
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + CAM_EPS)


@torch.no_grad()
def multiscale_target_cam(net: Backbone, images: Tensor, *, scales: tuple[float, ...], flip: bool) -> Tensor:
    """SCD's ``multi_scale_cam``: at each scale the CAM of the image (and of its mirror image,
    max-fused), ReLU, resized to the image; summed over scales, then min-max normalised.

    Args:
        net: the CAM network, in whatever mode the caller has it (SCD: training mode).
        images: B×3×H×W normalised images.
        scales: input scales; each side rounded to the patch for a ViT.
        flip: add the mirror image at every scale.

    Returns:
        B×1×H×W in [0, 1), no gradient.
    """
    b, _, h, w = images.shape
    multiple = net.patch[0] if net.is_vit else 1
    total = images.new_zeros(b, 1, h, w)
    weight = net.classifier.weight[:, :, None, None]
    for scale in scales:
        size = (small_view_side(h, scale, multiple), small_view_side(w, scale, multiple)) if scale != 1.0 else (h, w)
        x = images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cam = F.interpolate(F.conv2d(net.feature_map(x), weight.to(x.dtype)), (h, w), mode="bilinear",
                            align_corners=False)
        if flip:
            cam = torch.maximum(cam[:b], cam[b:].flip(-1))
        total += F.relu(cam).float()
    total = total - total.amin(dim=(2, 3), keepdim=True)
    return total / (total.amax(dim=(2, 3), keepdim=True) + CAM_EPS)


class SelfCorrespondence(Paradigm):
    """``self_correspondence``: the student, its segmentation head, every SCD term (module docstring).

    Args:
        cfg: the trial config; ``cfg.scd`` holds the settings, ``cfg.data`` the normalisation.
        net: the student backbone (the CAM network).
    """

    def __init__(self, cfg: TrialConfig, net: Backbone) -> None:
        super().__init__()
        check_classifier_map(net, field=f"model.{cfg.transfer.cam_network}", need=f"{cfg.transfer.paradigm} needs "
                             "a student", fix="choose another backbone (a ViT: head avg)")
        self.cam_net = net
        self.scd = s = cfg.scd
        self.blocks = head_block_indices(len(net.net.blocks), s.head_blocks) if net.is_vit else []
        self.head = SegmentationHead([net.num_features] * max(1, len(self.blocks)), num_classes=2,
                                     width=s.head_width, dropout=s.head_dropout)
        self.refine = partial(varm_refine, dilations=s.varm_dilations, iters=s.varm_iters, w_rgb=s.varm_w_rgb,
                              w_var=s.varm_w_var)
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1), persistent=False)
        self.term_weights = s.loss_weights(1, 1)  # after the warm-up, until `at_step` says otherwise

    def at_step(self, step: int, total_steps: int) -> None:
        self.term_weights = self.scd.loss_weights(step, total_steps)

    def param_groups(self, lr: float) -> list[dict]:
        head = set(self.head.parameters())
        rest = [p for p in self.trainable() if p not in head]
        return [{"params": rest, "lr": lr}, {"params": list(self.head.parameters()), "lr": lr * self.scd.head_lr_mult}]

    def segment(self, images: Tensor) -> Tensor:
        _, _, maps = self.cam_net.forward_with_blocks(images, self.blocks)
        return self.head(maps)

    def small_view(self, images: Tensor) -> Tensor:
        """The second view: ``images`` resized by ``scd.scale``, each side rounded to the patch."""
        h, w = images.shape[-2:]
        multiple = self.cam_net.patch[0] if self.cam_net.is_vit else 1
        size = (small_view_side(h, self.scd.scale, multiple), small_view_side(w, self.scd.scale, multiple))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=True)

    def loss(self, images, labels, teacher_fmap=None):
        logits, fmap, maps = self.cam_net.forward_with_blocks(images, self.blocks)
        cls = bce(logits, labels)
        w = self.term_weights
        total, terms = w["cls"] * cls, {"loss_cls": cls.item()}
        if any(w[t] > 0 for t in SCD_TERMS):
            scd_terms = self.scd_terms(images, labels, fmap, maps)
            for name, value in scd_terms.items():
                total = total + w[name] * value
                terms[f"loss_{name}"] = value.item()
        total, terms = self.extra_terms(total, terms, images, logits, fmap, teacher_fmap)
        return total, {"loss": total.item()} | terms

    def extra_terms(self, total, terms, images, logits, fmap, teacher_fmap):
        """Terms a subclass adds to the loss (``scd_with_teacher``: the transfer term)."""
        return total, terms

    def scd_terms(self, images: Tensor, labels: Tensor, fmap: Tensor, maps: list[Tensor]) -> dict[str, Tensor]:
        """Every SCD term whose weight is > 0 now, unweighted, by name."""
        w, s = self.term_weights, self.scd
        small = self.small_view(images)
        _, fmap_small, maps_small = self.cam_net.forward_with_blocks(small, self.blocks)
        cam, cam_small = scd_cam(self.cam_net, fmap), scd_cam(self.cam_net, fmap_small)
        seg, seg_small = self.head(maps), self.head(maps_small)
        if s.own_cam:
            target, target_small = cam.detach(), cam_small.detach()
        else:
            target = multiscale_target_cam(self.cam_net, images, scales=s.cam_scales, flip=s.cam_flip)
            target_small = multiscale_target_cam(self.cam_net, small, scales=s.cam_scales, flip=s.cam_flip)
        out: dict[str, Tensor] = {}
        if w["seg"] > 0 or w["energy"] > 0:
            h, w_ = images.shape[-2:]
            size = (max(1, round(h * s.seg_scale)), max(1, round(w_ * s.seg_scale)))
            rgb = (images * self.std + self.mean).clamp(0.0, 1.0).float()
            with torch.no_grad():
                target_full = F.interpolate(target.float(), (h, w_), mode="bilinear", align_corners=False)
                pseudo = pseudo_labels(rgb, target_full, high=s.bg_high, low=s.bg_low, present=labels[:, None] > 0.5,
                                       refine=self.refine, down_scale=s.label_down_scale, size=size)
            seg_at = F.interpolate(seg, size, mode="bilinear", align_corners=False)
            if w["seg"] > 0:
                out["seg"] = balanced_seg_loss(seg_at, pseudo)
            if w["energy"] > 0:
                rgb_at = rgb if size == (h, w_) else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
                # energy_loss resizes its inputs by `scale` and its σ_xy with them: in full-resolution
                # pixels σ_xy stays scd.energy_sigma_xy, as SCD's
                out["energy"] = energy_loss(rgb_at * 255, seg_at, pseudo, sigma_rgb=s.energy_sigma_rgb,
                                            sigma_xy=s.energy_sigma_xy * s.seg_scale,
                                            scale=s.energy_scale / s.seg_scale)
        if w["corr"] > 0:
            out["corr"] = correspondence_loss(correspondence_features(target), correspondence_features(target_small),
                                              seg, seg_small, points=s.points)
        if w["equivariance"] > 0:
            out["equivariance"] = scale_equivariance_loss(cam, cam_small)
        return out


class SCDWithTeacher(TransferTerm, SelfCorrespondence):
    """``scd_with_teacher``: `SelfCorrespondence` plus ``transfer.lam · L_transfer`` against the frozen
    teacher, computed as in ``teacher_student`` (cached teacher features when the trial has them)."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__(cfg, student)
        self.attach_transfer(cfg, student, teacher)
        self.freeze_teacher(cfg)

    def train(self, mode: bool = True) -> SCDWithTeacher:
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics, whatever the caller asks
        return self

    def extra_terms(self, total, terms, images, logits, fmap, teacher_fmap):
        tr = self.frozen_transfer(images, logits, fmap, teacher_fmap)
        return total + self.lam * tr, terms | {"loss_transfer": tr.item()}


def build_self_correspondence(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    return SelfCorrespondence(cfg, build_net(cfg.model.student, image_size=cfg.data.image_size))


def build_scd_with_teacher(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    return SCDWithTeacher(cfg, student, build_frozen_teacher(cfg, teacher_checkpoint))
