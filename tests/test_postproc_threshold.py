import numpy as np
import pytest

from postproc.threshold import seed_mask
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
