"""The SCD paradigms: the scd section's rules, each term's gradient path, the warm-up, the head's
learning rate, the frozen teacher, the head's evaluation, and a tiny seeded trial whose losses fall."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.config import TrialConfig, load_trial_config, names, save_config
from training.config.scd import SCDConfig, head_block_indices, small_view_side
from training.errors import ConfigError
from training.evaluate import EvalSet, extract_seg_masks
from training.loop import make_optimizer
from training.metrics import segmentation_scores
from training.models import build_net
from training.paradigms import build_paradigm, save_net_checkpoint
from training.scd import pseudo_labels
from training.tracker import RecordingTracker
from training.trial import run_trial, teacher_config

SCD = {"transfer.paradigm": "self_correspondence", "scd.scale": 0.5}  # a 16 px second view of the 32 px images
ONLY = {term: {f"scd.{t}_weight": float(t == term) for t in ("cls", "seg", "energy", "corr", "equivariance")}
        for term in ("seg", "energy", "corr", "equivariance")}  # fmt: skip


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory, make_config: Callable[..., TrialConfig]) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_net_checkpoint(build_net(make_config().model.teacher, image_size=32), path, meta={})
    return path


def _batch(b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(b, 3, 32, 32, generator=g), torch.tensor([1, 0, 1, 1][:b])


def _model(make_config, teacher: Path | None = None, **overrides):
    cfg = make_config(**(SCD | overrides))
    torch.manual_seed(0)
    return build_paradigm(cfg, str(teacher) if teacher else None)


# ---------------------------------------------------------------- the scd section at validate time


def test_an_scd_paradigm_gets_the_papers_settings_and_writes_them(make_config, tmp_path: Path) -> None:
    cfg = make_config(**{"transfer.paradigm": "self_correspondence"})
    assert cfg.scd == SCDConfig() and cfg.to_dict()["scd"]["points"] == 40
    save_config(cfg, tmp_path / "config.yaml")
    assert load_trial_config(tmp_path / "config.yaml") == cfg
    assert make_config().scd is None and make_config().to_dict()["scd"] is None  # baseline: no section


@pytest.mark.parametrize("paradigm", ["baseline", "teacher_student", "co_training"])
@pytest.mark.parametrize(("section", "field"), [({"scd.points": 16}, r"scd\.points"), ({"scd": {}}, r"scd: ")])
def test_scd_settings_on_another_paradigm_fail_naming_the_field(make_config, paradigm, section, field) -> None:
    with pytest.raises(ConfigError, match=rf"{field}.*apply only to transfer\.paradigm scd_with_teacher, "
                                          rf"self_correspondence; this trial's paradigm is '{paradigm}'"):
        make_config(**{"transfer.paradigm": paradigm, **section})


def test_a_vit_classifying_from_its_class_token_has_no_scd_feature_map(make_config) -> None:
    with pytest.raises(ConfigError, match=r"model\.student\.head: self_correspondence needs a backbone whose "
                                          r"feature map gives its logit.*set model\.student\.head: avg"):
        make_config(**{"transfer.paradigm": "self_correspondence", "model.student.head": "token",
                       "cam.method": "gradcam"})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"scd.seg_scale": 0.1, "scd.energy_scale": 0.5}, r"scd\.energy_scale: expected ≤ scd\.seg_scale"),
     ({"scd.cam_scales": []}, r"scd\.cam_scales"), ({"scd.head_lr_mult": 0}, r"scd\.head_lr_mult"),
     ({"scd.head_blocks": 0}, r"scd\.head_blocks"), ({"scd.varm_dilations": [1, 0]}, r"scd\.varm_dilations"),
     ({"scd.pointz": 3}, r'scd\.pointz: unknown key \(did you mean "points"\?\)')],
)  # fmt: skip
def test_bad_scd_values_fail_at_validate_time(make_config, overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_config(**{"transfer.paradigm": "scd_with_teacher", **overrides})


def test_the_teacher_of_an_scd_trial_is_a_plain_cnn_baseline(make_config) -> None:
    cfg = make_config(**{"transfer.paradigm": "scd_with_teacher", "scd.points": 8})
    teacher = teacher_config(cfg)
    assert teacher.transfer.paradigm == "baseline" and teacher.scd is None


@pytest.mark.parametrize(("side", "scale", "patch", "expected"),
                         [(64, 0.3, 8, 16), (64, 0.5, 8, 32), (512, 0.3, 16, 160), (32, 0.1, 8, 8), (64, 0.3, 1, 19)])
def test_small_view_side_rounds_to_the_patch(side, scale, patch, expected) -> None:
    assert small_view_side(side, scale, patch) == expected  # e.g. 64 · 0.3 = 19.2 → 2 patches of 8 px


@pytest.mark.parametrize(("depth", "count", "expected"),
                         [(12, 4, [2, 5, 8, 11]), (2, 4, [0, 1]), (8, 2, [3, 7]), (6, 1, [5])])
def test_head_blocks_spread_to_the_last(depth, count, expected) -> None:
    assert head_block_indices(depth, count) == expected


# ---------------------------------------------------------------- one step


def _has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize(
    ("term", "head", "classifier"),
    [("seg", True, False), ("energy", True, False), ("corr", True, False), ("equivariance", False, True)],
)
def test_each_term_trains_what_it_should(make_config, term, head, classifier) -> None:
    """The pseudo labels and the correspondence target are detached CAMs: seg, energy and corr reach
    the head (and through its inputs the backbone) but never the classifier, whose weights make the
    CAM; the equivariance term (ours: with a gradient) reaches the CAM, not the head."""
    model = _model(make_config, **ONLY[term]).train()
    loss, terms = model.loss(*_batch())
    loss.backward()
    assert terms[f"loss_{term}"] != 0.0
    assert _has_grad(model.head.parameters()) is head
    assert _has_grad([model.cam_net.classifier.weight]) is classifier
    assert _has_grad(model.cam_net.net.blocks.parameters())  # every term trains the backbone


def test_the_warm_up_trains_the_classifier_alone_and_skips_the_second_view(make_config, monkeypatch) -> None:
    model = _model(make_config, **{"scd.warmup_fraction": 0.25}).train()
    sides = []
    real = model.cam_net.forward_with_blocks
    monkeypatch.setattr(model.cam_net, "forward_with_blocks", lambda x, b: sides.append(x.shape[-1]) or real(x, b))
    model.at_step(2, 12)  # 0.25 · 12 = 3 warm-up steps: 0, 1, 2
    _, warm = model.loss(*_batch())
    model.at_step(3, 12)
    _, after = model.loss(*_batch())
    assert set(warm) == {"loss", "loss_cls"} and warm["loss"] == warm["loss_cls"]
    assert set(after) == {"loss", "loss_cls", "loss_seg", "loss_energy", "loss_corr", "loss_equivariance"}
    assert sides == [32, 32, 16]  # the 16 px view only after the warm-up


def test_the_head_learns_ten_times_faster(make_config) -> None:
    model, train = _model(make_config), make_config(**SCD).train
    opt, sched = make_optimizer(model, train, steps_per_epoch=4)
    body, head = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.trainable()}
    assert len(body["params"]) + len(head["params"]) == len(model.trainable())
    model.loss(*_batch())[0].backward()
    opt.step()
    sched.step()
    assert head["lr"] == pytest.approx(10 * body["lr"]) and body["lr"] < train.lr  # the ratio survives the schedule


def test_scd_with_teacher_keeps_the_teacher_frozen_and_adds_its_term(make_config, teacher_file: Path) -> None:
    model = _model(make_config, teacher_file, **{"transfer.paradigm": "scd_with_teacher", "transfer.lam": 0.5})
    model.train()
    assert not any(m.training for m in model.teacher.modules())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    images, labels = _batch()
    model.eval()  # the head's dropout off, so the two calls below see the same network
    with torch.no_grad():
        torch.manual_seed(3)  # the same correspondence points in both calls
        _, own = model.loss(images, labels)
        torch.manual_seed(3)
        _, cached = model.loss(images, labels, model.teacher.feature_map(images))
    assert own == pytest.approx(cached, rel=1e-6) and own["loss_transfer"] > 0
    model.train()
    loss, _ = model.loss(images, labels)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters()) and _has_grad(model.proj_student.parameters())


def test_a_step_draws_its_points_from_the_global_generator(make_config) -> None:
    """The loop reseeds torch's generator per epoch, so a resumed run draws the points a whole one does."""
    model = _model(make_config).eval()
    images, labels = _batch()
    with torch.no_grad():
        torch.manual_seed(3)
        first = model.loss(images, labels)[1]
        torch.manual_seed(3)
        again = model.loss(images, labels)[1]
        other = model.loss(images, labels)[1]
    assert first == again and first["loss_corr"] != other["loss_corr"]


# ---------------------------------------------------------------- pseudo labels


def test_one_class_labels_equal_the_general_stack() -> None:
    """One class takes a two-map shortcut (the sign of the refined p_fg − p_bg); the general
    (K + 1)-channel path, reached with a second class absent from every image, agrees."""
    g = torch.Generator().manual_seed(4)
    image, cam = torch.rand(3, 3, 24, 24, generator=g), torch.rand(3, 1, 24, 24, generator=g)
    present = torch.tensor([[True], [False], [True]])
    for size in (None, (6, 6)):
        one = pseudo_labels(image, cam, present=present, down_scale=2, size=size)
        two = pseudo_labels(image, torch.cat([cam, torch.rand(3, 1, 24, 24, generator=g)], 1), down_scale=2,
                            present=torch.cat([present, torch.zeros(3, 1, dtype=torch.bool)], 1), size=size)
        assert torch.equal(one, two)
        assert one.shape == (3, *(size or (24, 24))) and set(one[1].unique().tolist()) == {0}  # no smoke: all bg
        assert {0, 1, 255} <= set(one.unique().tolist())


# ---------------------------------------------------------------- evaluation of the head


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, side: int) -> None:
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(3, self.side, self.side), "id": f"im{i}", "label": 1}


def test_head_masks_are_its_argmax_at_the_native_size() -> None:
    """A head whose smoke logit wins on the left half of its 4×4 map: at a native 12 px the mask is
    the left 6 columns (bilinear resizing of a sharp ±1 margin crosses 0 at the middle)."""
    def segment(images: torch.Tensor) -> torch.Tensor:
        margin = torch.tensor([1.0, 1.0, -1.0, -1.0]).expand(images.shape[0], 1, 4, 4)
        return torch.cat([torch.zeros_like(margin), margin], dim=1)

    gts = [np.zeros((12, 12), bool) for _ in range(3)]
    for gt in gts:
        gt[:, :3] = True
    evalset = EvalSet(_Images(3, 8), gts, [None] * 3)
    masks = extract_seg_masks(segment, evalset, torch.device("cpu"), batch_size=2)
    expected = np.zeros((12, 12), bool)
    expected[:, :6] = True
    assert all(np.array_equal(m, expected) for m in masks)
    # IoU 3/6 per image, and dataset-level the same: 36 / 72
    assert segmentation_scores(masks, gts) == {"seg_miou": 0.5, "seg_miou_per_image": 0.5}


def test_segmentation_scores_by_hand() -> None:
    pred = np.array([[1, 1, 0, 0]], bool)
    gt_a, gt_b = np.array([[1, 0, 0, 0]], bool), np.array([[0, 0, 0, 0]], bool)  # b has no smoke: skipped
    chimney = np.array([[0, 1, 1, 0]], bool)
    scores = segmentation_scores([pred, pred], [gt_a, gt_b], [chimney, None])
    # a: intersection 1, union 2; the chimney's two pixels: one called smoke
    assert scores == {"seg_miou": 0.5, "seg_miou_per_image": 0.5, "seg_context_fp": 0.5}


# ---------------------------------------------------------------- a tiny seeded trial

# `make_config` as self_correspondence (seed 7, 4 epochs × 3 steps, a 16 px second view, the warm-up
# a quarter of the 12 steps = the first epoch), threads=1, CPU. Regenerate after a deliberate change
# with `.venv/bin/pytest tests/test_scd_paradigm.py -k golden -s` (the test prints the values).
GOLDEN_SCD = {
    "loss": [0.6937636137008667, 0.7168459097544352, 0.6858418186505636, 0.6775639851888021],
    "loss_seg": [0.7552116513252258, 0.5253723561763763, 0.46386072039604187],
    "loss_corr": [-0.6031489670276642, -0.631519635518392, -0.6380929946899414],
    "loss_equivariance": [0.23001418014367422, 0.20795735716819763, 0.2015767643849055],
    "miou": 0.1014585764294049,
    "seg_miou": 0.10205973223480948,
}


def test_golden_scd_trial_losses_fall(make_config, tmp_path: Path) -> None:
    cfg = make_config(**SCD, **{"train.epochs": 4, "scd.warmup_fraction": 0.25})
    tracker = RecordingTracker()
    metrics = run_trial(cfg, tmp_path / "out", tracker=tracker)
    epochs = [m for _, m in tracker.metrics if "epoch" in m]
    curves = {k: [m[k] for m in epochs if k in m] for k in ("loss", "loss_seg", "loss_corr", "loss_equivariance")}
    print("GOLDEN_SCD =", json.dumps(curves | {k: metrics[k] for k in ("miou", "seg_miou")}, indent=4))
    assert "loss_seg" not in epochs[0]  # the warm-up epoch trains the classifier alone
    for name, curve in curves.items():
        assert curve == pytest.approx(GOLDEN_SCD[name], abs=1e-6), name
        if name != "loss":  # the total rises once the SCD terms switch on, then falls
            assert all(b < a for a, b in itertools.pairwise(curve)), name
    assert curves["loss"][3] < curves["loss"][2] < curves["loss"][1]
    assert metrics["miou"] == pytest.approx(GOLDEN_SCD["miou"], abs=1e-6)
    assert metrics["seg_miou"] == pytest.approx(GOLDEN_SCD["seg_miou"], abs=1e-6)
    assert {"seg_miou_per_image", "seg_context_fp"} <= set(metrics)
    # the gallery: image | CAM | the head's mask, each at the native 48 px
    picture = cv2.imread(str(next((tmp_path / "out" / "gallery").glob("*.png"))))
    assert picture.shape == (48, 3 * 48, 3)


def test_the_head_is_scored_on_the_validation_split(make_config, tmp_path: Path) -> None:
    cfg = make_config(**SCD, **{"train.epochs": 1, "scd.warmup_fraction": 0.0, "data.val_fraction": 0.25,
                                "cam.gallery": 0})
    metrics = run_trial(cfg, tmp_path / "out", tracker=RecordingTracker())
    for key in ("seg_miou", "seg_miou_per_image", "val_seg_miou", "val_seg_miou_per_image", "val_seg_context_fp"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert names.PARADIGMS.get("self_correspondence").scd and not names.PARADIGMS.get("teacher_student").scd
