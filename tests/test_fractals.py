"""The fractal corpus: hand-checkable IFS attractors, σ-factor sampling, determinism,
classes that differ, and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.config.pretrain import FractalConfig
from training.errors import ConfigError, DataError
from training.fractals import (
    CANONICAL,
    IfsSystem,
    build_corpus,
    class_systems,
    ensure_corpus,
    fill_rate,
    load_corpus,
    render,
    sample_singular_values,
)

TINY = FractalConfig(classes=4, instances=3, val_instances=2, size=32, points_per_pixel=2.0, seed=5)


def _similarity_system(shifts: list[tuple[float, float]]) -> IfsSystem:
    """Maps p ↦ p/2 + b: every σ is 0.5, no rotation."""
    n = len(shifts)
    return IfsSystem(np.full((n, 2), 0.5), np.zeros((n, 2)), np.ones((n, 2)), np.array(shifts, float))


def _canonical(systems: list[IfsSystem], *, size: int = 32, density: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    rngs = [np.random.default_rng(i) for i in range(len(systems))]
    return render(systems, rngs, [CANONICAL] * len(systems), size, density)


def test_known_attractors_fill_what_they_should() -> None:
    # p/2 + {(0,0), (½,0), (0,½), (½,½)}: the attractor is the unit square, drawn to fit the
    # canvas: with 16 uniform points per pixel a pixel stays empty with probability e^-16, so
    # every pixel is hit. p/2 + {(0,0), (½,0)}: the segment [0,1]×{0}, one pixel row of 32,
    # so fill = 1/32.
    square = _similarity_system([(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)])
    segment = _similarity_system([(0, 0), (0.5, 0)])
    _, counts = _canonical([square, segment], density=16.0)
    assert fill_rate(counts)[0] == 1.0
    assert fill_rate(counts)[1] == pytest.approx(1 / 32)


def test_map_matrices_and_probabilities() -> None:
    # σ = (0.5, 0.25), θ = 90°, φ = 0, D = diag(1, −1): A = R(90°)·diag(0.5, 0.25)·D
    # = [[0, −1], [1, 0]]·[[0.5, 0], [0, −0.25]] = [[0, 0.25], [0.5, 0]]; |det A| = 0.125.
    s = IfsSystem(np.array([[0.5, 0.25], [0.5, 0.5]]), np.array([[np.pi / 2, 0.0], [0, 0]]),
                  np.array([[1.0, -1.0], [1, 1]]), np.zeros((2, 2)))  # fmt: skip
    np.testing.assert_allclose(s.matrices()[0], [[0.0, 0.25], [0.5, 0.0]], atol=1e-12)
    np.testing.assert_allclose(s.probabilities(), [0.125 / 0.375, 0.25 / 0.375])  # ∝ σ1·σ2


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_singular_values_meet_the_sigma_factor(n: int) -> None:
    for seed in range(50):
        rng = np.random.default_rng(seed)
        total = rng.uniform((5 + n) / 2, (6 + n) / 2)
        sv = sample_singular_values(rng, n, total)
        assert sv.shape == (n, 2)
        assert (sv[:, 0] >= sv[:, 1]).all() and sv.min() >= 0 and sv.max() <= 0.98
        if sv.max() < 0.98:  # not clipped: the weighted sum is exact
            assert (sv[:, 0] + 2 * sv[:, 1]).sum() == pytest.approx(total)


def test_corpus_is_deterministic_and_seeded() -> None:
    a, b = build_corpus(TINY), build_corpus(TINY)
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.train_images.shape == (4 * 3, 32, 32, 3) and a.train_images.dtype == np.uint8
    assert a.val_images.shape == (4 * 2, 32, 32, 3)
    assert np.bincount(a.train_labels).tolist() == [3, 3, 3, 3]
    other = build_corpus(FractalConfig(**{**TINY.__dict__, "seed": 6}))
    assert not np.array_equal(a.train_images, other.train_images)
    assert not any(np.array_equal(t, v) for t in a.train_images for v in a.val_images)  # held out


def test_more_classes_keep_the_first_ones() -> None:
    few, more = class_systems(TINY), class_systems(FractalConfig(**{**TINY.__dict__, "classes": 6}))
    for s, t in zip(few, more[:4], strict=True):
        np.testing.assert_array_equal(s.shift, t.shift)


def test_instances_look_like_their_class_more_than_like_others() -> None:
    """Occupancy IoU (canonical placement, so only the per-instance jitter varies) is
    higher within a class than between classes: the classes differ, the instances vary."""
    cfg = FractalConfig(classes=6, size=32, seed=1)
    systems = class_systems(cfg)
    rng = np.random.default_rng(0)
    insts = [(k, s.perturbed(rng, cfg.jitter)) for k, s in enumerate(systems) for _ in range(3)]
    _, counts = _canonical([s for _, s in insts])
    occ = counts > 0
    iou = (occ[:, None] & occ[None]).sum((2, 3)) / np.maximum((occ[:, None] | occ[None]).sum((2, 3)), 1)
    labels = np.array([k for k, _ in insts])
    same = labels[:, None] == labels[None]
    off_diag = ~np.eye(len(insts), dtype=bool)
    assert iou[same & off_diag].mean() > iou[~same].mean() + 0.15
    assert fill_rate(_canonical(systems)[1]).min() >= cfg.min_fill  # the filling-rate filter held


def test_corpus_cache_is_reused_and_guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_corpus(TINY, tmp_path / "c")
    first = load_corpus(path)
    monkeypatch.setattr("training.fractals.build_corpus", lambda cfg: pytest.fail("re-rendered a cached corpus"))
    assert ensure_corpus(TINY, tmp_path / "c") == path
    np.testing.assert_array_equal(load_corpus(path).train_images, first.train_images)
    with pytest.raises(DataError, match="another config"):
        ensure_corpus(FractalConfig(**{**TINY.__dict__, "seed": 9}), tmp_path / "c")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classes", 1, r"corpus\.classes: expected an integer in \[2, "),
        ("max_maps", 1, r"corpus\.max_maps: expected an integer in \[2, "),  # below min_maps
        ("min_fill", 1.5, r"corpus\.min_fill: expected a number in \[0\.0, 0\.9\]"),
        ("size", 24.0, r"corpus\.size: expected an integer"),
    ],
)
def test_bad_corpus_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FractalConfig(**{field: value})
