"""Training paradigms: which networks learn, and the loss they minimise.

- ``baseline``: one network (the ViT student or the CNN teacher), BCE only.
- ``teacher_student``: a frozen CNN teacher; the ViT student and both 1×1
  projections learn ``BCE(student) + λ · L_transfer(student, teacher)``.
- ``co_training``: both networks from scratch, both updated:
  ``BCE(student) + BCE(teacher) + λ · L_transfer``, gradients flowing both ways.

Every paradigm returns its loss terms by name so the orchestrator logs all of them.
What the rest of the code needs to know about a paradigm (does it need a frozen
teacher, may it cache the teacher's features, whose CAMs count) is in its entry
of `training.config.names.PARADIGMS`; the registry here holds the builders.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrialConfig, names
from training.errors import CheckpointError
from training.losses import build_transfer_loss
from training.models import Backbone, Projection, build_net, read_state_dict
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
        self.proj_student = Projection(student.num_features, k)
        self.proj_teacher = Projection(teacher.num_features, k)

    def transfer(self, s_logits, s_map, t_logits, t_map) -> torch.Tensor:
        if self.transfer_loss.on_logits:
            return self.transfer_loss(s_logits, t_logits)
        return self.transfer_loss(self.proj_student(s_map), self.proj_teacher(t_map))


class TeacherStudent(_Transfer):
    """The teacher is frozen (eval mode, no gradients); only the student and the
    projections learn."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__(cfg, student, teacher)
        teacher.requires_grad_(False)
        teacher.eval()

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
    torch.save({"format": "wsss-net", "meta": meta, "state_dict": net.net.state_dict()}, path)


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
