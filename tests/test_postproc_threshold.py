import numpy as np
import pytest

from postproc.masks import mask_iou
from postproc.threshold import oracle_threshold, seed_mask
from training.errors import ConfigError

ROW = np.array([[0.0, 0.1, 0.29, 0.3, 0.5, 1.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.3, [0, 0, 0, 1, 1, 1]),  # ≥ is inclusive
        (0.0, [1, 1, 1, 1, 1, 1]),
        (1.0, [0, 0, 0, 0, 0, 1]),
        (0.5, [0, 0, 0, 0, 1, 1]),
    ],
)
def test_seed_mask_table(threshold, expected):
    mask = seed_mask(ROW, threshold=threshold)
    assert mask.dtype == bool and mask.shape == ROW.shape
    np.testing.assert_array_equal(mask[0], np.array(expected, dtype=bool))


def test_seed_mask_default_is_thesis_threshold_and_input_untouched():
    cam = ROW.copy()
    np.testing.assert_array_equal(seed_mask(cam), cam >= 0.3)
    np.testing.assert_array_equal(cam, ROW)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "0.3", None])
def test_seed_mask_rejects_bad_threshold(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        seed_mask(ROW, threshold=threshold)


@pytest.mark.parametrize(
    ("cam", "match"),
    [
        (np.zeros((2, 2, 1), np.float32), "H×W"),
        (np.zeros((2, 2), np.uint8), "dtype"),
        (np.full((2, 2), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((2, 2), np.nan, np.float32), "finite"),
    ],
)
def test_seed_mask_rejects_bad_cam(cam, match):
    with pytest.raises(ValueError, match=match):
        seed_mask(cam)


def test_oracle_threshold_finds_the_ground_truth_cut():
    cam = np.tile(np.linspace(0, 1, 21, dtype=np.float32), (4, 1))
    gt = cam >= 0.6
    best, iou = oracle_threshold(cam, gt)
    assert best == pytest.approx(0.56)  # the 0.01 grid: 0.56 … 0.60 all cut at 0.6; ties go to the lowest
    assert iou == pytest.approx(1.0)
    # the fixed threshold is worse on this image
    assert mask_iou(seed_mask(cam), gt) < iou


def test_oracle_threshold_ties_go_to_first_and_empty_counts_as_perfect():
    cam = np.zeros((3, 3), np.float32)
    gt = np.zeros((3, 3), bool)
    assert oracle_threshold(cam, gt, thresholds=[0.2, 0.4]) == (0.2, 1.0)


def test_oracle_threshold_custom_candidates_and_validation():
    cam = np.array([[0.2, 0.8]], np.float32)
    gt = np.array([[True, True]])
    assert oracle_threshold(cam, gt, thresholds=[0.5, 0.1]) == (0.1, 1.0)
    with pytest.raises(ValueError, match="gt"):
        oracle_threshold(cam, np.ones((2, 1), bool))
    with pytest.raises(ConfigError, match="thresholds"):
        oracle_threshold(cam, gt, thresholds=[1.2])
    with pytest.raises(ValueError, match="thresholds"):
        oracle_threshold(cam, gt, thresholds=[])
