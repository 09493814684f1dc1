import numpy as np
import pytest

from postproc.crf import crf_refine, crf_unary
from postproc.masks import mask_iou
from postproc.threshold import seed_mask
from training.errors import ConfigError

SIZE = 64


def _blob() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - 32) ** 2 + (xx - 30) ** 2 < 14**2


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright blob on a dark background and a blurred, noisy CAM of it."""
    rng = np.random.default_rng(seed)
    blob = _blob()
    image = np.full((SIZE, SIZE, 3), 40.0)
    image[blob] = (220, 220, 230)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    dist = np.hypot(yy - 32, xx - 30)
    cam = 0.9 * np.exp(-((dist / 16) ** 2)) + rng.normal(0, 0.15, dist.shape)
    return image, np.clip(cam, 0, 1).astype(np.float32), blob


def _core_cam(width: float) -> np.ndarray:
    """A clean CAM on the blob's core only, min–max normalised (zero far away), as the thesis's are."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cam = np.exp(-((np.hypot(yy - 32, xx - 30) / width) ** 2))
    return ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)


def test_the_thesis_recipe_grows_an_undercovering_seed_to_the_object():
    """(1 − cam)^48 makes every pixel with some activation a candidate; the bilateral kernel
    and the 0.3 decision then keep the bright blob: 0.40 IoU for the seed, 1.0 after."""
    image, _, blob = _scene()
    cam = _core_cam(8.0)
    assert mask_iou(seed_mask(cam), blob) < 0.45
    assert mask_iou(crf_refine(image, cam, scale=1.0), blob) > 0.95
    # psa's kernels and argmax with alpha 1 cannot grow it: the background wins
    assert mask_iou(crf_refine(image, cam, recipe="psa", scale=1.0), blob) < 0.05


def test_threshold_and_argmax_decisions_differ_only_in_the_rule():
    image, _, _ = _scene()
    cam = _core_cam(8.0)
    at_03 = crf_refine(image, cam, decision="threshold", fg_threshold=0.3)
    at_05 = crf_refine(image, cam, decision="threshold", fg_threshold=0.5)
    assert np.array_equal(at_05, crf_refine(image, cam, decision="argmax"))  # two labels: argmax ⇔ p ≥ 0.5
    assert at_03.sum() >= at_05.sum()


def test_explicit_fields_override_the_recipe():
    image, cam, _ = _scene()
    psa = crf_refine(image, cam, recipe="psa")
    spelled = crf_refine(image, cam, recipe="thesis", alpha=1.0, iters=10, gauss_sxy=3.0, gauss_compat=3.0,
                         bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0, decision="argmax")
    np.testing.assert_array_equal(psa, spelled)


@pytest.mark.parametrize("seed", [0, 1])
def test_crf_snaps_a_noisy_cam_to_the_blob(seed):
    """psa's recipe (argmax, alpha 1) on a blurred, noisy CAM. (The thesis's alpha = 48
    calls every pixel with noise above ~0.05 smoke: its CAMs have exact zeros, these do not.)"""
    image, cam, blob = _scene(seed)
    image_before, cam_before = image.copy(), cam.copy()
    mask = crf_refine(image, cam, recipe="psa")
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
    assert mask_iou(mask, blob) > 0.95
    assert mask_iou(seed_mask(cam), blob) < 0.7
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(cam, cam_before)


def test_scale_divides_the_spatial_deviations():
    image, cam, _ = _scene()
    flat = np.full_like(image, 128)
    for img in (image, flat):
        scaled = crf_refine(img, cam, scale=2.0, gauss_sxy=3.0, bilateral_sxy=80.0)
        unscaled = crf_refine(img, cam, scale=1.0, gauss_sxy=1.5, bilateral_sxy=40.0)
        np.testing.assert_array_equal(scaled, unscaled)


def test_small_scale_collapses_where_large_scale_keeps_the_object():
    # Without image edges only the smoothness prior acts: wide kernels (scale 2)
    # let the background majority swallow the object, as in the thesis.
    _, cam, blob = _scene()
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)
    wide, local = crf_refine(flat, cam, scale=2, recipe="psa"), crf_refine(flat, cam, scale=16, recipe="psa")
    assert wide.sum() < local.sum()
    assert mask_iou(local, blob) > mask_iou(wide, blob)


def test_alpha_shifts_the_unary_towards_foreground():
    _, cam, _ = _scene()
    flat = np.full((SIZE, SIZE, 3), 128, np.uint8)
    assert crf_refine(flat, cam, alpha=3.0).sum() > crf_refine(flat, cam, alpha=1.0).sum()


def test_unary_is_negative_log_of_normalised_probabilities():
    cam = np.array([[0.0, 0.25, 1.0]], np.float32)
    unary = crf_unary(cam, alpha=2.0)
    assert unary.shape == (2, 3) and unary.dtype == np.float32
    probs = np.exp(-unary)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-4)
    # (1 - 0.25)^2 = 0.5625 vs 0.25
    np.testing.assert_allclose(probs[:, 1], [0.5625 / 0.8125, 0.25 / 0.8125], rtol=1e-5)


def test_non_contiguous_image_is_accepted():
    image, cam, _ = _scene()
    strided = np.asfortranarray(image)
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(crf_refine(strided, cam), crf_refine(image, cam))


@pytest.mark.parametrize(
    ("image", "cam", "match"),
    [
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32), "H×W×3"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), "uint8"),
        (np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8), np.float32), "match the CAM"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 3.0, np.float32), r"\[0, 1\]"),
    ],
)
def test_rejects_bad_arrays(image, cam, match):
    with pytest.raises(ValueError, match=match):
        crf_refine(image, cam)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"iters": 0}, "iters"),
        ({"iters": 2.5}, "iters"),
        ({"scale": 0.0}, "scale"),
        ({"alpha": -1.0}, "alpha"),
        ({"bilateral_srgb": 0.0}, "bilateral_srgb"),
        ({"gauss_compat": -1.0}, "gauss_compat"),
    ],
)
def test_rejects_bad_parameters(params, name):
    image = np.zeros((8, 8, 3), np.uint8)
    cam = np.zeros((8, 8), np.float32)
    with pytest.raises(ConfigError, match=name) as info:
        crf_refine(image, cam, **params)
    assert "expected" in str(info.value)
