"""Evaluation metrics: hand-computed tables on tiny masks and CAMs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from training.errors import DataError, UndefinedMetric
from training.metrics import (
    DEFAULT_THRESHOLDS,
    IoUCounter,
    accuracy,
    best_threshold,
    cam_scores,
    context_activation,
    context_false_positive,
    count_masks,
    iou_counts,
    masks_at,
    miou,
    miou_per_image,
    oracle_miou,
    subset_accuracy,
    threshold_counts,
)


def mask(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=bool)


def cam(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# Two smoke images and one without smoke, worked out by hand:
#   A (2×2): gt all smoke, pred all smoke      → (4, 4), IoU 1
#   B (3×3): gt one pixel, pred nothing        → (0, 1), IoU 0
#   C (2×2): no smoke in gt, pred everything   → excluded
GT_A, PRED_A = mask([1, 1], [1, 1]), mask([1, 1], [1, 1])
GT_B, PRED_B = mask([0, 0, 0], [0, 1, 0], [0, 0, 0]), np.zeros((3, 3), dtype=bool)
GT_C, PRED_C = np.zeros((2, 2), dtype=bool), np.ones((2, 2), dtype=bool)

# A ramp whose best threshold is obvious: smoke is the two brightest pixels.
#   t ≤ 0.2 → (2, 4);  0.2 < t ≤ 0.4 → (2, 3);  0.4 < t ≤ 0.6 → (2, 2);
#   0.6 < t ≤ 0.8 → (1, 2);  t > 0.8 → (0, 2)
RAMP_CAM, RAMP_GT = cam([0.2, 0.4, 0.6, 0.8]), mask([0, 0, 1, 1])
#   t ≤ 0.3 → (2, 2);  0.3 < t ≤ 0.9 → (1, 2)
HALF_CAM, HALF_GT = cam([0.3, 0.9]), mask([1, 1])


# ------------------------------------------------------------------------ counting


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        (mask([1, 1], [0, 0]), mask([1, 0], [1, 0]), (1, 3)),
        (mask([1, 1, 1], [0, 0, 0], [0, 0, 0]), mask([1, 0, 0], [1, 0, 0], [1, 0, 0]), (1, 5)),
        (np.ones((3, 3), bool), mask([0, 0, 0], [0, 1, 0], [0, 0, 0]), (1, 9)),
        (np.zeros((2, 2), bool), np.zeros((2, 2), bool), (0, 0)),
        (np.array([[0, 1], [1, 1]], np.uint8), np.array([[0, 1], [0, 1]], np.uint8), (2, 3)),
    ],
)
def test_iou_counts(pred: np.ndarray, gt: np.ndarray, expected: tuple[int, int]) -> None:
    assert iou_counts(pred, gt) == expected


def test_iou_counts_rejects_float_masks_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="masks_at"):
        iou_counts(np.full((2, 2), 0.5), mask([1, 0], [0, 1]))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 3\)"):
        iou_counts(np.zeros((2, 2), bool), np.zeros((3, 3), bool))


@pytest.mark.parametrize(
    ("cam_", "gt", "thresholds", "expected"),
    [
        (RAMP_CAM, RAMP_GT, [0.1, 0.3, 0.5, 0.7, 0.9], ([2, 2, 2, 1, 0], [4, 3, 2, 2, 2])),
        # a pixel exactly at a threshold counts as smoke (cam ≥ t)
        (RAMP_CAM, RAMP_GT, [0.2, 0.4, 0.6, 0.8], ([2, 2, 2, 1], [4, 3, 2, 2])),
        (HALF_CAM, HALF_GT, [0.3, 0.5, 0.95], ([2, 1, 0], [2, 2, 2])),
    ],
)
def test_threshold_counts_by_hand(
    cam_: np.ndarray, gt: np.ndarray, thresholds: list[float], expected: tuple[list, list]
) -> None:
    intersections, unions = threshold_counts(cam_, gt, thresholds)
    assert intersections.tolist() == expected[0] and unions.tolist() == expected[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threshold_counts_equals_masks_at_for_every_threshold(dtype: type) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        # many pixels sit exactly on a threshold, where float32 rounding could disagree
        cam_ = np.round(rng.random((7, 9)), 2).astype(dtype)
        gt = rng.random((7, 9)) < 0.4
        intersections, unions = threshold_counts(cam_, gt, DEFAULT_THRESHOLDS)
        for k, t in enumerate(DEFAULT_THRESHOLDS):
            assert (intersections[k], unions[k]) == iou_counts(masks_at([cam_], t)[0], gt)
            assert (intersections[k], unions[k]) == iou_counts(masks_at([cam_], float(t))[0], gt)


def test_cams_with_nan_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        threshold_counts(cam([0.5, np.nan]), mask([1, 0]), [0.5])


@pytest.mark.parametrize("thresholds", [[], [0.5, 0.3], [0.3, 0.3]])
def test_thresholds_must_increase(thresholds: list[float]) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        threshold_counts(RAMP_CAM, RAMP_GT, thresholds)


# ------------------------------------------------------------------------ smoke IoU


@pytest.mark.parametrize(
    ("preds", "gts", "dataset", "per_image"),
    [
        ([PRED_A], [GT_A], 1.0, 1.0),
        ([PRED_B], [GT_B], 0.0, 0.0),
        # dataset: (4 + 0) / (4 + 1) = 0.8; per image: (1 + 0) / 2 = 0.5
        ([PRED_A, PRED_B], [GT_A, GT_B], 0.8, 0.5),
        # an image without smoke changes neither, even though it is all false positive
        ([PRED_A, PRED_B, PRED_C], [GT_A, GT_B, GT_C], 0.8, 0.5),
        # A 2×2: (1, 3) → 1/3; B 3×3: (1, 5) → 1/5; dataset 2/8, per image 4/15
        (
            [mask([1, 1], [0, 0]), mask([1, 1, 1], [0, 0, 0], [0, 0, 0])],
            [mask([1, 0], [1, 0]), mask([1, 0, 0], [1, 0, 0], [1, 0, 0])],
            0.25,
            4 / 15,
        ),
    ],
)
def test_dataset_and_per_image_iou(
    preds: list, gts: list, dataset: float, per_image: float
) -> None:
    assert miou(preds, gts) == pytest.approx(dataset)
    assert miou_per_image(preds, gts) == pytest.approx(per_image)


def test_iou_without_any_smoke_is_an_error_of_the_data() -> None:
    """A fact of the data (``wsss`` answers it with exit 2 and a message), still a ValueError."""
    for metric, pred in ((miou, PRED_C), (miou_per_image, PRED_C), (oracle_miou, PRED_C.astype(np.float32))):
        with pytest.raises(UndefinedMetric, match="no image with smoke") as info:
            metric([pred], [GT_C])
        assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_lists_must_pair_up() -> None:
    with pytest.raises(ValueError, match="lengths"):
        miou([PRED_A, PRED_B], [GT_A])


def test_masks_at_is_cam_at_least_threshold() -> None:
    (result,) = masks_at([RAMP_CAM], 0.4)
    assert result.dtype == bool and result.tolist() == [[False, True, True, True]]


@pytest.mark.parametrize(
    ("cams", "gts", "thresholds", "expected"),
    [
        # every threshold in (0.4, 0.6] keeps exactly 0.6 and 0.8: IoU 1; ties go to the lowest, 0.41
        ([RAMP_CAM], [RAMP_GT], DEFAULT_THRESHOLDS, (0.41, 1.0)),
        ([RAMP_CAM], [RAMP_GT], [0.1, 0.3, 0.7], (0.3, 2 / 3)),
        # t=0.1: (2+2)/(4+2) = 2/3; t=0.5: (2+1)/(2+2) = 3/4; t=0.7: (1+1)/(2+2) = 1/2
        ([RAMP_CAM, HALF_CAM], [RAMP_GT, HALF_GT], [0.1, 0.5, 0.7], (0.5, 0.75)),
    ],
)
def test_best_threshold(cams: list, gts: list, thresholds, expected: tuple[float, float]) -> None:
    threshold, score = best_threshold(cams, gts, thresholds)
    assert threshold == pytest.approx(expected[0])
    assert score == pytest.approx(expected[1])


@pytest.mark.parametrize(
    ("cams", "gts", "thresholds", "expected"),
    [
        # each image at its own best: RAMP at 0.5 → 1, HALF at 0.1 → 1
        ([RAMP_CAM, HALF_CAM], [RAMP_GT, HALF_GT], [0.1, 0.5, 0.7], 1.0),
        # RAMP: 2/3 at 0.35, 1/2 at 0.7; HALF: 1/2 at both; no-smoke image skipped
        (
            [RAMP_CAM, HALF_CAM, cam([0.9])],
            [RAMP_GT, HALF_GT, mask([0])],
            [0.35, 0.7],
            (2 / 3 + 1 / 2) / 2,
        ),
    ],
)
def test_oracle_miou(cams: list, gts: list, thresholds, expected: float) -> None:
    assert oracle_miou(cams, gts, thresholds) == pytest.approx(expected)


# ------------------------------------------------------------------ IoUCounter


def test_counter_merge_equals_counting_everything_at_once() -> None:
    preds, gts = [PRED_A, PRED_B, PRED_C], [GT_A, GT_B, GT_C]
    first, second = count_masks(preds[:1], gts[:1]), count_masks(preds[1:], gts[1:])
    first_before = first.to_dict()
    merged = first.merge(second)
    assert merged == count_masks(preds, gts)
    assert merged.to_dict() == {
        "intersection": 4,
        "union": 5,
        "iou_sum": 1.0,
        "n_images": 2,
        "n_skipped": 1,
    }
    assert first.to_dict() == first_before  # merge returns a new counter


def test_counter_round_trips_through_dict() -> None:
    counter = count_masks([PRED_A, PRED_B], [GT_A, GT_B])
    restored = IoUCounter.from_dict(counter.to_dict())
    assert restored == counter
    assert (restored.miou, restored.miou_per_image) == (0.8, 0.5)


def test_empty_counter_has_no_iou() -> None:
    with pytest.raises(ValueError, match="undefined"):
        _ = IoUCounter().miou


# ----------------------------------------------------------------- co-occurrence

# 1: cam mass 2, 0.5 of it on the context          → share 1/4; fp at 0.3: 1/1
# 2: uniform cam, context everywhere               → share 1;   fp at 0.3: 0/4
# 3: zero cam, non-empty context                   → skipped;   fp at 0.3: 0/1
# 4, 5: no context (None, all false)               → skipped by both
CTX_CAMS = [
    cam([0.5, 0.5], [0.0, 1.0]),
    cam([0.2, 0.2], [0.2, 0.2]),
    cam([0.0, 0.0]),
    cam([1.0]),
    cam([1.0]),
]
CTX_MASKS = [mask([1, 0], [0, 0]), mask([1, 1], [1, 1]), mask([1, 0]), None, mask([0])]


def test_context_activation() -> None:
    assert context_activation(CTX_CAMS, CTX_MASKS) == pytest.approx((0.25 + 1.0) / 2)


def test_context_activation_of_all_zero_cams_is_nan() -> None:
    assert np.isnan(context_activation([cam([0.0, 0.0])], [mask([1, 0])]))


def test_context_false_positive() -> None:
    assert context_false_positive(CTX_CAMS, CTX_MASKS, 0.3) == pytest.approx(1 / 3)


@pytest.mark.parametrize("metric", [context_activation, context_false_positive])
def test_context_metrics_need_a_context(metric) -> None:
    args = (0.3,) if metric is context_false_positive else ()
    with pytest.raises(ValueError, match="context"):
        metric([cam([1.0])], [None], *args)


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("logits", "labels", "expected"),
    [
        ([2.0, -1.0, 0.0, 0.5], [1, 0, 1, 0], 0.5),  # logit 0 is "no smoke"
        (np.array([[3.0], [-3.0]]), [True, False], 1.0),
        ([-1.0], [True], 0.0),
    ],
)
def test_accuracy(logits, labels, expected: float) -> None:
    assert accuracy(logits, labels) == expected


def test_accuracy_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="lengths"):
        accuracy([1.0, 2.0], [True])


# --------------------------------------------------------------------- cam_scores


def test_cam_scores_by_hand() -> None:
    cams = [RAMP_CAM, HALF_CAM]
    gts = [RAMP_GT, HALF_GT]
    contexts = [mask([1, 0, 0, 0]), None]  # RAMP's context pixel 0.2: mass 0.2 / 2.0
    scores = cam_scores(
        cams, gts, contexts, [1.0, -1.0], [1, 1], threshold=0.5, thresholds=[0.1, 0.5, 0.7]
    )
    assert scores == pytest.approx(
        {
            "miou": 0.75,  # (2 + 1) / (2 + 2)
            "miou_per_image": 0.75,  # (1 + 1/2) / 2
            "best_threshold": 0.5,
            "miou_best_threshold": 0.75,
            "oracle_miou": 1.0,
            "accuracy": 0.5,
            "context_activation": 0.1,
            "context_fp": 0.0,
        }
    )


def test_cam_scores_omits_context_metrics_without_contexts() -> None:
    for contexts in (None, [None, mask([0, 0])]):
        scores = cam_scores(
            [RAMP_CAM, HALF_CAM], [RAMP_GT, HALF_GT], contexts, [1.0, 1.0], [1, 1], threshold=0.3
        )
        assert set(scores) == {
            "miou",
            "miou_per_image",
            "best_threshold",
            "miou_best_threshold",
            "oracle_miou",
            "accuracy",
        }


def test_inputs_not_mutated() -> None:
    rng = np.random.default_rng(1)
    cams = [rng.random((4, 5)), rng.random((3, 3)).astype(np.float32)]
    gts = [rng.random((4, 5)) < 0.5, rng.random((3, 3)) < 0.5]
    contexts = [rng.random((4, 5)) < 0.3, None]
    logits, labels = np.array([0.3, -0.2]), np.array([True, False])
    before = copy.deepcopy((cams, gts, contexts, logits, labels))
    cam_scores(cams, gts, contexts, logits, labels, threshold=0.3)
    for after, original in zip((cams, gts, contexts, logits, labels), before, strict=True):
        for a, o in zip(after, original, strict=True):
            assert (a is None and o is None) or np.array_equal(a, o)


@pytest.mark.parametrize(
    ("logits", "labels", "subsets", "expected"),
    [
        # coupled: 2 of 2 right; decoupled: smoke missed, clean right → 1/2
        ([2.0, -1.0, -0.5, -3.0], [1, 0, 1, 0], ["coupled", "coupled", "decoupled", "decoupled"],
         {"accuracy_coupled": 1.0, "accuracy_decoupled": 0.5}),
        # one subset only; logit exactly 0 counts as "no smoke"
        ([0.0, 1.0, 1.0], [1, 1, 0], ["coupled"] * 3, {"accuracy_coupled": 1 / 3}),
        # N×1 logits, bool labels, names sorted in the result
        ([[1.0], [1.0]], [True, False], ["b", "a"], {"accuracy_a": 0.0, "accuracy_b": 1.0}),
    ],
)
def test_subset_accuracy(logits, labels, subsets, expected) -> None:
    got = subset_accuracy(logits, labels, subsets)
    assert list(got) == sorted(expected)
    assert got == pytest.approx(expected)


def test_subset_accuracy_rejects_unpaired_lists() -> None:
    with pytest.raises(ValueError, match="pair up"):
        subset_accuracy([1.0, 2.0], [1, 1], ["coupled"])
