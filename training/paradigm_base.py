"""What every paradigm shares: the base class, the thesis's transfer term, teacher checkpoints.

`training.paradigms` builds the grid's paradigms from these parts (and holds their
registry); `training.scd.paradigm` builds Self Correspondence Distillation's from the
same parts, so ``scd_with_teacher``'s transfer term is ``teacher_student``'s, line for line.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import write_torch
from training.config import TrialConfig
from training.errors import CheckpointError, ConfigError
from training.losses import build_transfer_loss
from training.models import Backbone, Projection, build_net, pcm_refine, read_state_dict


class Paradigm(nn.Module):
    """Base class. ``cam_net`` is the network whose CAMs are evaluated."""

    cam_net: Backbone

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, teacher_fmap: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args: B×3×H×W images, B labels in {0,1}; ``teacher_fmap`` is an optional
        precomputed B×C×h×w frozen-teacher feature map (the feature cache).
        Returns the total loss and every term as a float."""
        raise NotImplementedError

    def at_step(self, step: int, total_steps: int) -> None:
        """Told before each training step where in the schedule it is (0-based, of ``total_steps``);
        paradigms with a warm-up (SCD) switch their terms on from it, the others ignore it."""

    def segment(self, images: torch.Tensor) -> torch.Tensor | None:
        """B×3×H×W normalised images → B×2×h×w segmentation logits (background, smoke) of the
        paradigm's segmentation head, or None when it has none (every paradigm but SCD's)."""
        return None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict]:
        """The optimiser's parameter groups at base learning rate ``lr`` (one group here)."""
        return [{"params": self.trainable(), "lr": lr}]

    def use_channels_last(self) -> Paradigm:
        """Put every CNN backbone of this paradigm in channels-last memory format."""
        for module in self.modules():
            if isinstance(module, Backbone):
                module.use_channels_last()
        return self


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), labels.float())


class ClassifierMapTarget(nn.Module):
    """The teacher's classifier map as the thesis's teacher gives it: B×C×h×w features →
    B×2×h×w, channel 0 the smoke classifier ``w·F + b`` (plus the same of the PCM-refined
    features when the teacher has ``pcm``), channel 1 an extra 1×1 convolution that no
    loss trains (the thesis's ``fc8`` has K + 1 outputs and its classifier reads only the
    first). In co-training the extra channel learns through the transfer term, as there.

    Args:
        teacher: the teacher backbone; its classifier is used, not copied.
        seed: initialises the extra channel (the thesis's fc8: Kaiming normal, fan-out).
    """

    def __init__(self, teacher: Backbone, *, seed: int) -> None:
        super().__init__()
        check_classifier_map(teacher)
        self.pcm = teacher.pcm
        self.extra = nn.Conv2d(teacher.num_features, 1, kernel_size=1)
        gen = torch.Generator().manual_seed(seed)
        fan_in = teacher.num_features
        with torch.no_grad():  # as the thesis's fc8 (K + 1 = 2 outputs): kaiming_normal_(fan_out), default bias
            self.extra.weight.copy_(torch.randn(self.extra.weight.shape, generator=gen) * math.sqrt(2.0 / 2))
            self.extra.bias.copy_((torch.rand(1, generator=gen) * 2 - 1) / math.sqrt(fan_in))

    def forward(self, teacher: Backbone, fmap: torch.Tensor) -> torch.Tensor:
        target = torch.cat([teacher.classifier_map(fmap), self.extra(fmap)], dim=1)
        if self.pcm:  # fc8(conv6) + fc8(PCM(conv6)): PCM mixes positions linearly, so it commutes with fc8
            refined = [pcm_refine(target[:, k], fmap) for k in range(target.shape[1])]
            target = target + torch.stack(refined, dim=1)
        return target


def check_classifier_map(net: Backbone, *, side: int = 64, field: str = "transfer.teacher_target",
                         need: str = "classifier_map needs a teacher",
                         fix: str = "use transfer.teacher_target: projection") -> None:
    """Refuse a network whose classifier is not linear over its last feature map (a norm or an
    MLP between pooling and the classifier, a ViT classifying from its class token): the mean
    of its "classifier map" would not be its logit, so the thesis's target (and SCD's CAM)
    would not exist.

    Raises:
        ConfigError: naming ``field``, who ``need``s it, the network and ``fix``.
    """
    was_training = net.training
    probe = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.eval()
        logits, fmap = net(probe)
        net.train(was_training)
    if fmap.ndim != 4 or not torch.allclose(net.classifier_map(fmap).mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4):
        raise ConfigError(
            f"{field}: {need} whose logit is the linear classifier of its mean feature map (a ResNet or "
            f"EfficientNet, a ViT with head: avg); {type(net.net).__name__} is not one; {fix}"
        )


class TransferTerm:
    """The thesis's ``L_transfer(proj(student), target(teacher))``, mixed into a paradigm.

    `attach_transfer` sets the attributes on the paradigm itself (so their state-dict
    keys are ``proj_student.*``, ``target.*``, ``teacher.*`` wherever the term is used).
    """

    lam: float
    teacher: Backbone
    proj_student: nn.Module
    target: nn.Module

    def attach_transfer(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        t = cfg.transfer
        self.lam = t.lam
        self.transfer_loss = build_transfer_loss(t.metric, t.level, temperature=t.temperature)  # resolved once
        self.teacher = teacher
        k = cfg.model.proj_channels
        if t.target_info.teacher_projection:  # ours: both sides project, no bias (see Projection)
            self.proj_student = Projection(student.num_features, k)
            self.target = Projection(teacher.num_features, k)
        else:  # the thesis: the student's `vit_proj = Conv2d(embed_dim, 2, 1)`, a bias included
            self.proj_student = Projection(student.num_features, k, bias=True)
            self.target = ClassifierMapTarget(teacher, seed=cfg.train.seed)

    def freeze_teacher(self, cfg: TrialConfig) -> None:
        """teacher_student: the teacher (and the thesis's target) take no gradient, in eval mode."""
        frozen = [self.teacher] + ([] if cfg.transfer.target_info.teacher_projection else [self.target])
        for module in frozen:
            module.requires_grad_(False)
            module.eval()

    def teacher_target(self, t_map: torch.Tensor) -> torch.Tensor:
        """B×C_t×h×w teacher features → the B×K×h×w map the student is aligned with."""
        if isinstance(self.target, ClassifierMapTarget):
            return self.target(self.teacher, t_map)
        return self.target(t_map)

    def transfer(self, s_logits, s_map, t_logits, t_map) -> torch.Tensor:
        if self.transfer_loss.on_logits:
            return self.transfer_loss(s_logits, t_logits)
        return self.transfer_loss(self.proj_student(s_map), self.teacher_target(t_map))

    def frozen_transfer(self, images, s_logits, s_map, teacher_fmap=None) -> torch.Tensor:
        """The transfer term against the frozen teacher, from its cached B×C×h×w features when given."""
        if teacher_fmap is None:
            with torch.no_grad():
                teacher_fmap = self.teacher.feature_map(images)
        t_map = teacher_fmap.to(s_map.dtype)
        t_logits = self.teacher.logits_from(t_map).detach()
        return self.transfer(s_logits, s_map, t_logits, t_map)


def build_frozen_teacher(cfg: TrialConfig, checkpoint: str | None) -> Backbone:
    """The trained teacher of ``cfg`` loaded from ``checkpoint`` (or ``transfer.teacher_checkpoint``)."""
    path = checkpoint or cfg.transfer.teacher_checkpoint
    if not path:
        raise CheckpointError(
            f"transfer.teacher_checkpoint: {cfg.transfer.paradigm} needs a trained teacher checkpoint"
        )
    # The checkpoint replaces every weight, so never fetch ImageNet weights first.
    teacher = build_net(dataclasses.replace(cfg.model.teacher, pretrained="false"), image_size=cfg.data.image_size)
    load_own_checkpoint(teacher, path)
    return teacher


def save_net_checkpoint(net: Backbone, path, *, meta: dict) -> None:
    """Write a backbone's weights and a small metadata dict (loadable with weights_only)."""
    write_torch({"format": "wsss-net", "meta": meta, "state_dict": net.net.state_dict()}, path)  # full disk: ENOSPC


def load_own_checkpoint(net: Backbone, path) -> None:
    """Strictly load a checkpoint written by `save_net_checkpoint` into ``net``."""
    state = read_state_dict(path)
    if not (isinstance(state, dict) and state.get("format") == "wsss-net"):
        raise CheckpointError(f"{path}: not a wsss-sweeps network checkpoint (expected format 'wsss-net')")
    weights, own = state["state_dict"], net.net.state_dict()
    # load_state_dict raises a bare RuntimeError on shape mismatches even with strict=False
    reshaped = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{path}: weights do not fit the configured teacher (missing {len(missing)}, e.g. "
            f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}; other shape "
            f"{len(reshaped)}, e.g. {reshaped[:2]}); "
            "check model.teacher matches the config the checkpoint was trained with"
        )
    net.net.load_state_dict(weights)
