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

- ``self_correspondence`` and ``scd_with_teacher``: Self Correspondence Distillation,
  without and with the frozen teacher's transfer term (`training.scd.paradigm`).

Every paradigm returns its loss terms by name so the orchestrator logs all of them.
What the rest of the code needs to know about a paradigm (does it need a frozen
teacher, may it cache the teacher's features, whose CAMs count) is in its entry
of `training.config.names.PARADIGMS`; the registry here holds the builders. The
parts every paradigm shares (the base class, the transfer term, teacher checkpoints)
are in `training.paradigm_base` and importable from here too.
"""

from __future__ import annotations

from training.config import TrialConfig, names
from training.models import Backbone, build_net
from training.paradigm_base import (
    ClassifierMapTarget,
    Paradigm,
    TransferTerm,
    bce,
    build_frozen_teacher,
    check_classifier_map,
    load_own_checkpoint,
    save_net_checkpoint,
)
from training.registry import Registry
from training.scd.paradigm import build_scd_with_teacher, build_self_correspondence

__all__ = [
    "PARADIGMS", "Baseline", "ClassifierMapTarget", "CoTraining", "Paradigm", "TeacherStudent", "bce",
    "build_paradigm", "check_classifier_map", "load_own_checkpoint", "save_net_checkpoint",
]  # fmt: skip

PARADIGMS: Registry = Registry("paradigm", names=names.PARADIGMS)


class Baseline(Paradigm):
    def __init__(self, net: Backbone) -> None:
        super().__init__()
        self.cam_net = net

    def loss(self, images, labels, teacher_fmap=None):
        logits, _ = self.cam_net(images)
        loss = bce(logits, labels)
        return loss, {"loss": loss.item(), "loss_cls": loss.item()}


class TeacherStudent(TransferTerm, Paradigm):
    """The teacher and its target are frozen (eval mode, no gradients); only the student
    and its projection learn."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__()
        self.cam_net = student
        self.attach_transfer(cfg, student, teacher)
        self.freeze_teacher(cfg)

    def train(self, mode: bool = True) -> TeacherStudent:
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics, whatever the caller asks
        return self

    def loss(self, images, labels, teacher_fmap=None):
        s_logits, s_map = self.cam_net(images)
        cls = bce(s_logits, labels)
        tr = self.frozen_transfer(images, s_logits, s_map, teacher_fmap)
        loss = cls + self.lam * tr
        return loss, {"loss": loss.item(), "loss_cls": cls.item(), "loss_transfer": tr.item()}


class CoTraining(TransferTerm, Paradigm):
    """Both networks learn; gradients reach the teacher through the transfer term too."""

    def __init__(self, cfg: TrialConfig, student: Backbone, teacher: Backbone) -> None:
        super().__init__()
        self.cam_net = student
        self.attach_transfer(cfg, student, teacher)

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
    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    return TeacherStudent(cfg, student, build_frozen_teacher(cfg, teacher_checkpoint))


@PARADIGMS.register("co_training")
def build_co_training(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    teacher = build_net(cfg.model.teacher, image_size=cfg.data.image_size)
    return CoTraining(cfg, student, teacher)


PARADIGMS.register("self_correspondence")(build_self_correspondence)
PARADIGMS.register("scd_with_teacher")(build_scd_with_teacher)


def build_paradigm(cfg: TrialConfig, teacher_checkpoint: str | None = None) -> Paradigm:
    """The paradigm named in ``cfg.transfer.paradigm``, with fresh (or loaded) networks."""
    return PARADIGMS.get(cfg.transfer.paradigm, field="transfer.paradigm")(cfg, teacher_checkpoint)
