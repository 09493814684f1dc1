"""Knowledge-transfer losses: hand-computed units and metric values, every valid pair."""

from __future__ import annotations

import math

import pytest
import torch

from training.config.names import valid_pairs
from training.errors import ConfigError
from training.losses import (
    LEVELS,
    METRICS,
    check_pair,
    transfer_loss,
)

LN3 = math.log(3.0)

# B=1, C=2, H=1, W=2: channel 0 is [1, 2], channel 1 is [3, 4].
TINY = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])


def units(*rows: list[float]) -> torch.Tensor:
    """One sample whose N units are ``rows``: 1×N×D."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).unsqueeze(0)


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs_for(level: str, seed: int) -> torch.Tensor:
    return seeded(2, 1, seed=seed) if level == "logits" else seeded(2, 3, 4, 5, seed=seed)


# ------------------------------------------------------------------------- levels


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("global", [[1.0, 2.0, 3.0, 4.0]]),
        ("spatial", [[1.0, 3.0], [2.0, 4.0]]),
        ("channel", [[1.0, 2.0], [3.0, 4.0]]),
        ("channel_matched", [[1.0, 2.0], [3.0, 4.0]]),
        ("spatial_map", [[2.0, 3.0]]),
        # F = [[1, 2], [3, 4]]; F·Fᵀ = [[5, 11], [11, 25]]; / (H·W = 2); columns as units
        ("gram", [[2.5, 5.5], [5.5, 12.5]]),
        ("gram_flat", [[2.5, 5.5, 5.5, 12.5]]),
    ],
)
def test_level_units_of_tiny_map(level: str, expected: list[list[float]]) -> None:
    assert torch.equal(LEVELS.get(level)(TINY), units(*expected))


def test_logit_units_are_one_unit_per_sample() -> None:
    logits = torch.tensor([[0.5], [-2.0]])
    assert torch.equal(LEVELS.get("logits")(logits), torch.tensor([[[0.5]], [[-2.0]]]))


def test_registered_names() -> None:
    assert METRICS.names() == ["cosine", "kl", "l1", "l2", "mse"]
    assert LEVELS.names() == [
        "channel", "channel_matched", "global", "gram", "gram_flat", "logits", "spatial", "spatial_map"
    ]


# ------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    ("metric", "student", "teacher", "expected"),
    [
        ("cosine", [1, 0], [0, 1], 1.0),
        ("cosine", [1, 2], [2, 4], 0.0),
        ("cosine", [1, 0], [-1, 0], 2.0),
        ("cosine", [1, 1], [1, 0], 1 - 1 / math.sqrt(2)),
        ("l1", [1, 2], [2, 4], 1.5),  # (1 + 2) / 2
        ("l1", [0, 0, 0], [3, 0, -3], 2.0),  # (3 + 0 + 3) / 3
        ("l2", [1, 2], [2, 4], math.sqrt(5.0)),  # the thesis: a norm, √(1 + 4)
        ("l2", [0, 0, 0], [3, 0, -3], 3 * math.sqrt(2.0)),  # √(9 + 0 + 9)
        ("mse", [1, 2], [2, 4], 2.5),  # (1 + 4) / 2
        ("mse", [0, 0, 0], [3, 0, -3], 6.0),  # (9 + 0 + 9) / 3
        # p_t = softmax([ln3, 0]) = [3/4, 1/4], p_s = [1/2, 1/2]
        ("kl", [0, 0], [LN3, 0], 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
        # reversed: p_t = [1/2, 1/2], p_s = [3/4, 1/4]
        ("kl", [LN3, 0], [0, 0], 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)),
        ("kl", [5, 5], [0, 0], 0.0),  # softmax is shift invariant
        # one element = Bernoulli: σ(0) = 1/2, σ(ln3) = 3/4
        ("kl", [0], [LN3], 0.25 * math.log(0.5) + 0.75 * math.log(1.5)),
    ],
)
def test_metric_on_hand_made_vectors(
    metric: str, student: list[float], teacher: list[float], expected: float
) -> None:
    value = METRICS.get(metric)(units(student), units(teacher), 1.0)
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_kl_temperature_softens_and_scales_by_t_squared() -> None:
    # T=2: p_t = softmax([ln√3, 0]) = [√3, 1] / (√3 + 1), p_s = [1/2, 1/2]
    root3 = math.sqrt(3.0)
    p = [root3 / (root3 + 1), 1 / (root3 + 1)]
    expected = 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    value = METRICS.get("kl")(units([0, 0]), units([LN3, 0]), 2.0)
    assert value.item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------- the loss


def test_loss_averages_over_units() -> None:
    # positions: student [1,0], [1,0]; teacher [0,1], [1,0] → losses 1 and 0
    student = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
    assert transfer_loss(student, teacher, metric="cosine", level="spatial").item() == 0.5


def test_loss_averages_over_batch() -> None:
    student = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).view(2, 2, 1, 1)
    teacher = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(2, 2, 1, 1)
    loss = transfer_loss(student, teacher, metric="cosine", level="global")
    assert loss.item() == pytest.approx(0.5)  # (1 + 0) / 2


def test_logits_kl_with_one_sigmoid_output() -> None:
    student = torch.tensor([[0.0], [0.0]])
    teacher = torch.tensor([[LN3], [0.0]])
    loss = transfer_loss(student, teacher, metric="kl", level="logits")
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5) + 0.0) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("student", "metric", "expected"),
    [
        # teacher [0, 4] resized bilinearly (align_corners=False) to width 4 is [0, 1, 3, 4]
        ([0.0, 1.0, 3.0, 4.0], "l2", 0.0),
        ([0.0, 0.0, 0.0, 0.0], "l1", 2.0),  # (0 + 1 + 3 + 4) / 4
    ],
)
def test_teacher_resized_to_student(student: list[float], metric: str, expected: float) -> None:
    teacher = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2)
    loss = transfer_loss(
        torch.tensor(student).view(1, 1, 1, 4), teacher, metric=metric, level="global"
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("metric", "level"), valid_pairs())
def test_every_valid_pair(metric: str, level: str) -> None:
    student, teacher = inputs_for(level, seed=1), inputs_for(level, seed=2)
    loss = transfer_loss(student, teacher, metric=metric, level=level)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert loss.item() >= 0
    if level == "channel":  # all pairs: zero only when every channel is alike
        student = student[:, :1].expand_as(student).clone()
    same = transfer_loss(student, student.clone(), metric=metric, level=level)
    assert same.item() == pytest.approx(0.0, abs=1e-5)


def test_all_pairs_channel_cosine_cannot_reach_zero_with_distinct_channels() -> None:
    """The thesis's channel level: 1 − mean over all C_s×C_t pairs; channels [1,0] and [0,1]
    against themselves: cos = 1 (i = j) twice and 0 (i ≠ j) twice → 1 − 2/4 = 0.5."""
    maps = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert transfer_loss(maps, maps.clone(), metric="cosine", level="channel").item() == pytest.approx(0.5)
    assert transfer_loss(maps, maps.clone(), metric="cosine", level="channel_matched").item() == pytest.approx(0.0)


@pytest.mark.parametrize(("metric", "level"), valid_pairs())
def test_gradients_reach_both_sides(metric: str, level: str) -> None:
    student = inputs_for(level, seed=3).requires_grad_()
    teacher = inputs_for(level, seed=4).requires_grad_()
    transfer_loss(student, teacher, metric=metric, level=level).backward()
    for grad in (student.grad, teacher.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_gradients_reach_teacher_through_resize() -> None:
    student = seeded(1, 2, 4, 4, seed=5).requires_grad_()
    teacher = seeded(1, 2, 2, 2, seed=6).requires_grad_()
    transfer_loss(student, teacher, metric="cosine", level="channel").backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_inputs_not_mutated() -> None:
    student, teacher = seeded(1, 2, 3, 3, seed=7), seeded(1, 2, 2, 2, seed=8)
    before = (student.clone(), teacher.clone())
    transfer_loss(student, teacher, metric="kl", level="gram", temperature=2.0)
    assert torch.equal(student, before[0]) and torch.equal(teacher, before[1])


# ---------------------------------------------------------------------- validation


def test_valid_pairs_table() -> None:
    pairs = valid_pairs()
    assert len(pairs) == 5 * 8 - 5
    assert ("kl", "logits") in pairs and ("cosine", "global") in pairs and ("l2", "spatial") in pairs
    for invalid in [("cosine", "logits"), ("l1", "spatial"), ("mse", "channel_matched")]:
        assert invalid not in pairs


@pytest.mark.parametrize(
    ("metric", "level", "why"),
    [
        ("cosine", "logits", "sign"),
        ("l1", "spatial", "use level=global"),
        ("l1", "channel_matched", "use level=global"),
        ("mse", "spatial", "use level=global"),
        ("mse", "channel_matched", "use level=global"),
    ],
)
def test_invalid_pairs_say_why(metric: str, level: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        check_pair(metric, level)
    assert f"metric={metric}" in str(info.value) and f"level={level}" in str(info.value)
    with pytest.raises(ConfigError):
        transfer_loss(TINY, TINY, metric=metric, level=level)


@pytest.mark.parametrize(
    ("metric", "level", "listed"),
    [
        ("cos", "global", "cosine, kl, l1, l2, mse"),
        ("cosine", "pixel", "channel, channel_matched, global, gram, gram_flat, logits, spatial, spatial_map"),
    ],
)
def test_unknown_names_list_valid_ones(metric: str, level: str, listed: str) -> None:
    with pytest.raises(ConfigError, match=listed):
        check_pair(metric, level)


@pytest.mark.parametrize(
    ("student", "teacher", "level"),
    [
        ((2, 3, 4, 4), (2, 5, 4, 4), "global"),  # C differs
        ((2, 3, 4, 4), (1, 3, 4, 4), "spatial"),  # B differs
        ((2, 1), (3, 1), "logits"),
        ((2, 3, 4, 4), (2, 3, 4), "channel"),  # not 4-D
        ((2, 3, 4, 4), (2, 3, 4, 4), "logits"),  # feature maps at level logits
    ],
)
def test_shape_mismatch_names_both_shapes(
    student: tuple[int, ...], teacher: tuple[int, ...], level: str
) -> None:
    with pytest.raises(ConfigError) as info:
        transfer_loss(torch.zeros(student), torch.zeros(teacher), metric="kl", level=level)
    assert str(student) in str(info.value) and str(teacher) in str(info.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        transfer_loss(TINY, TINY, metric="kl", level="global", temperature=temperature)
