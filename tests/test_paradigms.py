"""Paradigms: loss terms, who gets gradients, frozen teachers, teacher checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.config import TrialConfig, names
from training.config.names import valid_pairs
from training.errors import CheckpointError, ConfigError
from training.loop import make_optimizer
from training.models import build_net
from training.paradigms import (
    PARADIGMS,
    Paradigm,
    build_paradigm,
    load_own_checkpoint,
    save_net_checkpoint,
)

SCD_TERMS = {"loss_seg", "loss_energy", "loss_corr", "loss_equivariance"}
TERMS = {
    "baseline": {"loss", "loss_cls"},
    "teacher_student": {"loss", "loss_cls", "loss_transfer"},
    "co_training": {"loss", "loss_cls", "loss_cls_teacher", "loss_transfer"},
    "self_correspondence": {"loss", "loss_cls", *SCD_TERMS},
    "scd_with_teacher": {"loss", "loss_cls", "loss_transfer", *SCD_TERMS},
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory, make_config: Callable[..., TrialConfig]) -> Path:
    """A teacher checkpoint as `ensure_teacher` writes it (random weights, seed 5)."""
    torch.manual_seed(5)
    teacher = build_net(make_config().model.teacher, image_size=32)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_net_checkpoint(teacher, path, meta={"config": "{}"})
    return path


def _build(make_config, paradigm: str, teacher_file: Path, **overrides) -> Paradigm:
    cfg = make_config(**{"transfer.paradigm": paradigm, **overrides})
    torch.manual_seed(0)
    ckpt = str(teacher_file) if cfg.transfer.paradigm_info.frozen_teacher else None
    return build_paradigm(cfg, ckpt)


def _batch(b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(b, 3, 32, 32, generator=g), torch.tensor([1, 0, 1, 0][:b])


def test_registered_paradigms() -> None:
    assert PARADIGMS.names() == sorted(TERMS)


@pytest.mark.parametrize("paradigm", PARADIGMS.names())
def test_every_paradigm_gives_finite_named_terms(make_config, teacher_file: Path, paradigm: str) -> None:
    model = _build(make_config, paradigm, teacher_file, **{"transfer.lam": 0.5}).train()
    images, labels = _batch()
    before = images.clone()
    loss, terms = model.loss(images, labels)
    assert set(terms) == TERMS[paradigm]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in terms.values())
    assert terms["loss"] == pytest.approx(loss.item())
    expected = terms["loss_cls"] + terms.get("loss_cls_teacher", 0.0) + 0.5 * terms.get("loss_transfer", 0.0)
    if names.PARADIGMS.get(paradigm).scd:  # SCD's weighted terms, after the warm-up (no at_step call)
        weights = model.scd.loss_weights(1, 1)
        expected += sum(weights[k.removeprefix("loss_")] * terms[k] for k in SCD_TERMS)
    assert terms["loss"] == pytest.approx(expected, rel=1e-6)
    assert torch.equal(images, before)


@pytest.mark.parametrize("paradigm", PARADIGMS.names())
def test_name_table_facts_agree_with_the_built_paradigm(make_config, teacher_file: Path, paradigm: str) -> None:
    """The facts `wsss validate` decides from (names.PARADIGMS) are what the builder makes."""
    cfg = make_config(**{"transfer.paradigm": paradigm})
    facts = cfg.transfer.paradigm_info
    model = _build(make_config, paradigm, teacher_file)
    assert ("loss_transfer" in TERMS[paradigm]) is facts.transfer
    teacher = getattr(model, "teacher", None)
    frozen = teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    assert frozen is facts.frozen_teacher
    assert facts.teacher_cache <= facts.frozen_teacher  # only a frozen teacher's features are constant
    assert model.cam_net.is_vit is cfg.cam_net.is_vit and cfg.transfer.cam_network == (facts.cam_network or "student")


def test_a_training_step_looks_no_name_up(make_config, teacher_file: Path, monkeypatch) -> None:
    """`transfer.metric` and `transfer.level` are resolved when the paradigm is built, never per step."""
    import training.losses as losses

    model = _build(make_config, "co_training", teacher_file, **{"transfer.metric": "l1"})

    def no_lookup(*args, **kwargs):
        raise AssertionError("a name was looked up during a training step")

    monkeypatch.setattr(losses.METRICS, "get", no_lookup)
    monkeypatch.setattr(losses.LEVELS, "get", no_lookup)
    monkeypatch.setattr(losses, "check_pair", no_lookup)
    loss, terms = model.loss(*_batch())
    assert torch.isfinite(loss) and terms["loss_transfer"] > 0


def test_baseline_network_choice(make_config, teacher_file: Path) -> None:
    assert _build(make_config, "baseline", teacher_file).cam_net.is_vit
    assert not _build(make_config, "baseline", teacher_file, **{"transfer.baseline_network": "teacher"}).cam_net.is_vit


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _has_signal(module: torch.nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module))


def test_teacher_student_freezes_the_teacher(make_config, teacher_file: Path) -> None:
    """The thesis's kd.py: the teacher and its 2-channel target take no gradient, are in no
    optimiser group, and give bit-identical targets before and after a training step."""
    model = _build(make_config, "teacher_student", teacher_file)
    model.train()
    assert model.cam_net.training and model.proj_student.training
    assert not any(m.training for m in model.teacher.modules())  # BatchNorm statistics frozen
    stats = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    frozen = [*model.teacher.parameters(), *model.target.parameters()]
    opt, _ = make_optimizer(model, make_config().train, steps_per_epoch=1)
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in frozen)
    assert {id(p) for p in model.proj_student.parameters()} <= optimised

    images, labels = _batch()
    with torch.no_grad():
        before = model.teacher_target(model.teacher.feature_map(images))
    assert before.shape[1] == 2  # the smoke classifier map and the untrained channel
    opt.zero_grad()
    loss, _ = model.loss(images, labels)
    loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    for part in (model.cam_net, model.proj_student):
        assert _has_signal(part), type(part).__name__
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        assert torch.equal(model.teacher_target(model.teacher.feature_map(images)), before)


def test_the_target_is_the_teachers_classifier_map(make_config, teacher_file: Path) -> None:
    """Channel 0 is w·F + b at every position: its spatial mean is the teacher's logit."""
    model = _build(make_config, "teacher_student", teacher_file).eval()
    images, _ = _batch()
    with torch.no_grad():
        logits, fmap = model.teacher(images)
        target = model.teacher_target(fmap)
    assert torch.allclose(target[:, 0].mean(dim=(1, 2)), logits[:, 0], atol=1e-5)


def test_the_projection_target_learns_on_the_teacher_side(make_config, teacher_file: Path) -> None:
    model = _build(make_config, "teacher_student", teacher_file, **{"transfer.teacher_target": "projection"})
    loss, _ = model.loss(*_batch())
    loss.backward()
    assert _has_signal(model.target) and all(p.grad is None for p in model.teacher.parameters())


def test_teacher_student_uses_cached_teacher_features(make_config, teacher_file: Path) -> None:
    model = _build(make_config, "teacher_student", teacher_file).eval()
    images, labels = _batch()
    with torch.no_grad():
        fmap = model.teacher.feature_map(images)
        _, own = model.loss(images, labels)
        _, cached = model.loss(images, labels, fmap)
    assert own == pytest.approx(cached, rel=1e-6)


def test_co_training_updates_both(make_config, teacher_file: Path) -> None:
    model = _build(make_config, "co_training", teacher_file).train()
    assert model.teacher.training
    trainable = {id(p) for p in model.trainable()}
    assert all(id(p) in trainable for p in model.teacher.parameters())
    loss, _ = model.loss(*_batch())
    loss.backward()
    for part in (model.cam_net, model.teacher, model.proj_student, model.target):
        assert _has_signal(part), type(part).__name__  # the target's extra channel learns too, as in co-teaching.py


@pytest.mark.parametrize(("metric", "level"), valid_pairs())
def test_every_valid_transfer_pair(make_config, teacher_file: Path, metric: str, level: str) -> None:
    model = _build(make_config, "teacher_student", teacher_file, **{"transfer.metric": metric, "transfer.level": level})
    loss, terms = model.loss(*_batch())
    assert torch.isfinite(loss) and terms["loss_transfer"] >= -1e-6
    loss.backward()
    assert _has_signal(model.cam_net)
    if level != "logits":  # the logit level compares logits, not projected maps
        assert _has_signal(model.proj_student)


# ---------------------------------------------------------------- teacher checkpoints


def test_teacher_checkpoint_round_trip(make_config, teacher_file: Path) -> None:
    model = _build(make_config, "teacher_student", teacher_file)
    torch.manual_seed(5)  # the seed `teacher_file` was built with
    original = build_net(make_config().model.teacher, image_size=32)
    for key, value in original.net.state_dict().items():
        assert torch.equal(model.teacher.net.state_dict()[key], value), key


def test_teacher_student_needs_a_checkpoint(make_config) -> None:
    with pytest.raises(CheckpointError, match="teacher_student needs a trained teacher checkpoint"):
        build_paradigm(make_config(**{"transfer.paradigm": "teacher_student"}))


def test_config_teacher_checkpoint_is_used(make_config, teacher_file: Path) -> None:
    cfg = make_config(**{"transfer.paradigm": "teacher_student", "transfer.teacher_checkpoint": str(teacher_file)})
    assert build_paradigm(cfg).teacher is not None


def _other_teacher(make_config, **changes):
    cfg = make_config(**{f"model.teacher.{k}": v for k, v in changes.items()})
    return build_net(cfg.model.teacher, image_size=32)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        ("missing", "checkpoint file does not exist"),
        ("plain_state_dict", "not a wsss-sweeps network checkpoint"),
        ("other_arch", "weights do not fit the configured teacher"),
        ("other_width", "weights do not fit the configured teacher"),
    ],
)
def test_load_own_checkpoint_is_strict(make_config, tmp_path: Path, write: str, message: str) -> None:
    path = tmp_path / "t.pt"
    torch.manual_seed(0)
    if write == "plain_state_dict":
        torch.save(_other_teacher(make_config).net.state_dict(), path)
    elif write == "other_arch":  # resnet18 has keys resnet10t lacks
        save_net_checkpoint(
            _other_teacher(make_config, name="resnet18", options={"channels": [8, 16, 32, 64]}), path, meta={}
        )
    elif write == "other_width":  # same keys, other shapes
        save_net_checkpoint(
            _other_teacher(make_config, options={"channels": [8, 16, 32, 128], "stem_width": 8}), path, meta={}
        )
    target = _other_teacher(make_config)
    with pytest.raises(CheckpointError) as err:
        load_own_checkpoint(target, path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_teacher_without_a_linear_classifier_map_is_refused(make_config) -> None:
    """A ViT teacher classifying from its class token has no map whose mean is its logit."""
    vit_teacher = {"name": "vit_tiny_patch16_224", "head": "token",
                   "options": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}  # fmt: skip
    cfg = make_config(**{"transfer.paradigm": "co_training", "model.teacher": vit_teacher, "cam.method": "gradcam"})
    with pytest.raises(ConfigError, match=r"classifier_map needs a teacher .*use transfer\.teacher_target: projection"):
        build_paradigm(cfg)
    assert build_paradigm(cfg.replace(**{"transfer.teacher_target": "projection"})) is not None
