"""Training paradigms: which networks learn, and the loss they minimise.

- ``baseline``: one network (the ViT student or the CNN teacher), BCE only.
- ``teacher_student``: a frozen CNN teacher; the ViT student and its 1×1
  projection learn ``BCE(student) + λ · L_transfer(proj(student), target(teacher))``.
- ``co_training``: both networks from scratch, both updated:
  ``BCE(student) + BCE(teacher) + λ · L_transfer``, gradients flowing both ways.

The teacher's side of the transfer term (``transfer.teacher_target``) is, as in the
thesis's code, the teacher's own 2-channel classifier map (`ClassifierMapTarget`):
the smoke classifier applied at every position, plus one extra 1×1 channel that no
loss trains. Only the student projects. ``projection`` (ours) gives the teacher a
learnable 1×1 projection too, which in teacher_student lets both projections shrink
towards each other on fixed features (the L2 loss can reach ~0 that way).

Every paradigm returns its loss terms by name so the orchestrator logs all of them.
What the rest of the code needs to know about a paradigm (does it need a frozen
teacher, may it cache the teacher's features, whose CAMs count) is in its entry
of `training.config.names.PARADIGMS`; the registry here holds the builders.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import write_torch
from training.config import TrialConfig, names
from training.errors import CheckpointError, ConfigError
from training.losses import build_transfer_loss
from training.models import Backbone, Projection, build_net, pcm_refine, read_state_dict
from training.registry import Registry

PARADIGMS: Registry = Registry("paradigm", names=names.PARADIGMS)


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

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def use_channels_last(self) -> Paradigm:
        """Put every CNN backbone of this paradigm in channels-last memory format."""
        for module in self.modules():
            if isinstance(module, Backbone):
                module.use_channels_last()
        return self


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), labels.float())


class Baseline(Paradigm):
    def __init__(self, net: Backbone) -> None:
        super().__init__()
        self.cam_net = net

    def loss(self, images, labels, teacher_fmap=None):
        logits, _ = self.cam_net(images)
        loss = bce(logits, labels)
        return loss, {"loss": loss.item(), "loss_cls": loss.item()}


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


def check_classifier_map(teacher: Backbone, *, side: int = 64) -> None:
    """Refuse a teacher whose classifier is not linear over its last feature map (a norm or an
    MLP between pooling and the classifier, a ViT classifying from its class token): the mean
    of its "classifier map" would not be its logit, so the thesis's target would not exist.

    Raises:
        ConfigError: naming the teacher and the fix.
    """
    was_training = teacher.training
    probe = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher.eval()
        logits, fmap = teacher(probe)
        teacher.train(was_training)
    if not torch.allclose(teacher.classifier_map(fmap).mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4):
        raise ConfigError(
            f"transfer.teacher_target: classifier_map needs a teacher whose logit is the linear classifier of "
            f"its mean feature (a ResNet or EfficientNet, a ViT with head: avg); {type(teacher.net).__name__} "
            "is not one; use transfer.teacher_target: projection"
        )


class _Transfer(Paradigm):
    """Shared parts of the two two-network paradigms."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__()
        t = cfg.transfer
        self.lam = t.lam
        self.transfer_loss = build_transfer_loss(t.metric, t.level, temperature=t.temperature)  # resolved once
        self.cam_net = student
        self.teacher = teacher
        k = cfg.model.proj_channels
        if t.target_info.teacher_projection:  # ours: both sides project, no bias (see Projection)
            self.proj_student = Projection(student.num_features, k)
            self.target = Projection(teacher.num_features, k)
        else:  # the thesis: the student's `vit_proj = Conv2d(embed_dim, 2, 1)`, a bias included
            self.proj_student = Projection(student.num_features, k, bias=True)
            self.target = ClassifierMapTarget(teacher, seed=cfg.train.seed)

    def teacher_target(self, t_map: torch.Tensor) -> torch.Tensor:
        """B×C_t×h×w teacher features → the B×K×h×w map the student is aligned with."""
        if isinstance(self.target, ClassifierMapTarget):
            return self.target(self.teacher, t_map)
        return self.target(t_map)

    def transfer(self, s_logits, s_map, t_logits, t_map) -> torch.Tensor:
        if self.transfer_loss.on_logits:
            return self.transfer_loss(s_logits, t_logits)
        return self.transfer_loss(self.proj_student(s_map), self.teacher_target(t_map))


class TeacherStudent(_Transfer):
    """The teacher and its target are frozen (eval mode, no gradients); only the student
    and its projection learn."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__(cfg, student, teacher)
        frozen = [teacher] + ([] if cfg.transfer.target_info.teacher_projection else [self.target])
        for module in frozen:
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> TeacherStudent:
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics, whatever the caller asks
        return self

    def loss(self, images, labels, teacher_fmap=None):
        s_logits, s_map = self.cam_net(images)
        if teacher_fmap is None:
            with torch.no_grad():
                teacher_fmap = self.teacher.feature_map(images)
        t_map = teacher_fmap.to(s_map.dtype)
        t_logits = self.teacher.logits_from(t_map).detach()
        cls = bce(s_logits, labels)
        tr = self.transfer(s_logits, s_map, t_logits, t_map)
        loss = cls + self.lam * tr
        return loss, {"loss": loss.item(), "loss_cls": cls.item(), "loss_transfer": tr.item()}


class CoTraining(_Transfer):
    def loss(self, images, labels, teacher_fmap=None):
        s_logits, s_map = self.cam_net(images)
        t_logits, t_map = self.teacher(images)
        cls_s, cls_t = bce(s_logits, labels), bce(t_logits, labels)
        tr = self.transfer(s_logits, s_map, t_logits, t_map)
        loss = cls_s + cls_t + self.lam * tr
        terms = {"loss": loss.item(), "loss_cls": cls_s.item(), "loss_cls_teacher": cls_t.item()}
        return loss, terms | {"loss_transfer": tr.item()}


@PARADIGMS.register("baseline")
def build_baseline(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    return Baseline(build_net(cfg.cam_net, image_size=cfg.data.image_size))


@PARADIGMS.register("teacher_student")
def build_teacher_student(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    path = teacher_checkpoint or cfg.transfer.teacher_checkpoint
    if not path:
        raise CheckpointError("transfer.teacher_checkpoint: teacher_student needs a trained teacher checkpoint")
    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    # The checkpoint replaces every weight, so never fetch ImageNet weights first.
    frozen = dataclasses.replace(cfg.model.teacher, pretrained="false")
    teacher = build_net(frozen, image_size=cfg.data.image_size)
    load_own_checkpoint(teacher, path)
    return TeacherStudent(cfg, student, teacher)


@PARADIGMS.register("co_training")
def build_co_training(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    teacher = build_net(cfg.model.teacher, image_size=cfg.data.image_size)
    return CoTraining(cfg, student, teacher)


def build_paradigm(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    """The paradigm named in ``cfg.transfer.paradigm``, with fresh (or loaded) networks."""
    return PARADIGMS.get(cfg.transfer.paradigm, field="transfer.paradigm")(cfg, teacher_checkpoint)


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
