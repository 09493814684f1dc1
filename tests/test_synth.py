"""Synthetic benchmark: determinism, layout, the built-in co-occurrence flaw, caching."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from training import synth
from training.errors import ConfigError, DataError
from training.synth import SynthConfig, generate, plan, preview, render

SMALL = SynthConfig(size=64, n_train=20, n_test=16, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(SMALL, tmp_path_factory.mktemp("synth") / "ds")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_layout_and_counts(dataset: Path) -> None:
    assert len(list((dataset / "train/smoke").glob("*.png"))) == round(20 * 0.6)
    assert len(list((dataset / "train/clean").glob("*.png"))) == 20 - round(20 * 0.6)
    stems = {
        sub: sorted(p.stem for p in (dataset / "test" / sub).glob("*.png"))
        for sub in ("images", "masks", "context")
    }
    assert len(stems["images"]) == 16
    assert stems["images"] == stems["masks"] == stems["context"]
    image = cv2.imread(str(dataset / "test/images" / f"{stems['images'][0]}.png"))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3
    assert sorted(e["id"] for e in manifest["test"]) == stems["images"]
    assert not list(dataset.parent.glob(".tmp-*")), "temporary folder left behind"


@pytest.mark.parametrize("split", ["train", "test"])
def test_masks_are_binary_and_match_manifest_labels(dataset: Path, split: str) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    for entry in manifest[split]:
        mask = _gray(dataset / split / "masks" / f"{entry['id']}.png")
        context = _gray(dataset / split / "context" / f"{entry['id']}.png")
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        assert set(np.unique(context)) <= {0, 255}
        assert bool(mask.any()) == entry["smoke"], entry
        assert bool(context.any()) == entry["chimney"], entry


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = generate(SMALL, tmp_path / "again")
    assert _files(again) == _files(dataset)
    other = generate(replace(SMALL, seed=4), tmp_path / "other")
    differing = [k for k, v in _files(other).items() if _files(dataset).get(k) != v]
    assert len(differing) > 20


def test_rendering_does_not_depend_on_order(dataset: Path) -> None:
    spec = plan(SMALL, "test")[7]  # rendered alone, without the images before it
    image, smoke, chimney = render(SMALL, spec)
    stored = cv2.cvtColor(
        cv2.imread(str(dataset / "test/images" / f"{spec.id}.png")), cv2.COLOR_BGR2RGB
    )
    np.testing.assert_array_equal(image, stored)
    np.testing.assert_array_equal(smoke, _gray(dataset / "test/masks" / f"{spec.id}.png") > 0)
    np.testing.assert_array_equal(chimney, _gray(dataset / "test/context" / f"{spec.id}.png") > 0)


def test_default_rendering_is_unchanged() -> None:
    # SHA-256 over every image, smoke mask and chimney mask of SMALL, as generator version 3
    # rendered them (commit 0864127). Version 4 only added files (training masks) and the
    # chimney_with_smoke option; the pixels of a default config must stay exactly these.
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for spec in plan(SMALL, split):
            for array in render(SMALL, spec):
                digest.update(array.tobytes())
    assert digest.hexdigest() == "69491649c325a96e24944547cce5832364814956ee91cce3cb26c11199a778d5"


def test_training_masks_are_the_rendered_ones(dataset: Path) -> None:
    spec = plan(SMALL, "train")[5]
    _, smoke, chimney = render(SMALL, spec)
    np.testing.assert_array_equal(smoke, _gray(dataset / "train/masks" / f"{spec.id}.png") > 0)
    np.testing.assert_array_equal(chimney, _gray(dataset / "train/context" / f"{spec.id}.png") > 0)


def test_chimney_with_smoke_hides_training_chimneys_only() -> None:
    base = replace(SMALL, n_train=200, n_test=40)
    assert all(s.chimney for s in plan(base, "train") if s.smoke)  # default 1.0: the flaw
    none = plan(replace(base, chimney_with_smoke=0.0), "train")
    assert not any(s.chimney for s in none if s.smoke)
    half = replace(base, chimney_with_smoke=0.5, chimney_in_clean=0.5)
    specs = plan(half, "train")
    with_smoke = np.mean([s.chimney for s in specs if s.smoke])
    with_clean = np.mean([s.chimney for s in specs if not s.smoke])
    assert 0.35 < with_smoke < 0.65 and 0.35 < with_clean < 0.65  # the chimney says ~nothing
    # clean images draw exactly as before, and the test split is not touched
    clean = [s for s in plan(replace(base, chimney_in_clean=0.5), "train") if not s.smoke]
    assert [s.chimney for s in clean] == [s.chimney for s in specs if not s.smoke]
    assert plan(half, "test") == plan(replace(base, chimney_in_clean=0.5), "test")


def test_a_plume_without_its_chimney_is_drawn_like_decoupled_smoke() -> None:
    cfg = replace(SMALL, n_train=30, chimney_with_smoke=0.0)
    smoke_specs = [s for s in plan(cfg, "train") if s.smoke]
    masks = [render(cfg, s) for s in smoke_specs]
    assert all(sm.any() and not ch.any() for _, sm, ch in masks)
    assert np.mean([sm[-6:].any() for _, sm, _ in masks]) >= 0.6  # mostly rising from below the frame


def test_every_training_smoke_image_shows_its_chimney_at_the_plume_base() -> None:
    cfg = replace(SMALL, n_train=30, chimney_in_clean=0.0)
    specs = plan(cfg, "train")
    assert sum(s.smoke for s in specs) == 18
    for spec in specs:
        _, smoke, chimney = render(cfg, spec)
        assert chimney.any() == spec.smoke, spec  # chimney_in_clean=0: only smoke has chimneys
        if spec.smoke:
            # The plume starts at the chimney top: the smoke touches the chimney's neighbourhood.
            near = cv2.dilate(chimney.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            assert (smoke & near).any(), spec


def test_chimney_in_clean_controls_clean_chimneys() -> None:
    always = plan(replace(SMALL, n_train=200, chimney_in_clean=1.0), "train")
    assert all(s.chimney for s in always)
    some = plan(replace(SMALL, n_train=200, chimney_in_clean=0.3), "train")
    clean = [s.chimney for s in some if not s.smoke]
    assert 0.15 < np.mean(clean) < 0.45


def test_decoupled_subset_breaks_the_correlation(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    dec = [e for e in manifest["test"] if e["subset"] == "decoupled"]
    cpl = [e for e in manifest["test"] if e["subset"] == "coupled"]
    assert len(dec) == round(16 * 0.25) == 4
    assert (
        sorted((e["smoke"], e["chimney"]) for e in dec) == [(False, True)] * 2 + [(True, False)] * 2
    )
    assert all(e["chimney"] for e in cpl if e["smoke"])
    assert sum(e["smoke"] for e in cpl) == round(12 * 0.6)
    assert any(not e["smoke"] for e in cpl), "coupled subset must contain clean images"


def test_decoupled_smoke_mostly_rises_from_below_the_frame() -> None:
    # Same plume shape as coupled smoke with the chimney hidden below the bottom edge, so the
    # subset tests smoke without its chimney rather than an unseen plume shape.
    cfg = replace(SMALL, n_test=60, decoupled_fraction=1.0)
    smoke = [render(cfg, s)[1] for s in plan(cfg, "test") if s.smoke]
    assert len(smoke) == 30
    touching_bottom = np.mean([m[-6:].any() for m in smoke])
    assert touching_bottom >= 0.7
    assert touching_bottom < 1.0, "some plumes still enter from a side edge"


def test_plume_is_large_and_chimney_small_and_plume_scale_controls_size() -> None:
    def smoke_fractions(scale: float) -> list[float]:
        cfg = replace(SMALL, size=96, n_test=40, plume_scale=scale)
        return [render(cfg, s)[1].mean() for s in plan(cfg, "test") if s.smoke]

    normal = smoke_fractions(1.0)
    assert min(normal) >= 0.01 and max(normal) <= 0.35
    assert np.mean(smoke_fractions(0.5)) < 0.6 * np.mean(normal)
    chimneys = [render(SMALL, s)[2].mean() for s in plan(SMALL, "test") if s.chimney]
    assert max(chimneys) < 0.06


def test_cache_hit_does_not_rewrite(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (dataset / "manifest.json").stat().st_mtime_ns

    def fail(*_: object) -> None:
        raise AssertionError("rendered on a cache hit")

    monkeypatch.setattr(synth, "render", fail)
    assert generate(SMALL, dataset) == dataset
    assert (dataset / "manifest.json").stat().st_mtime_ns == before


def test_changed_config_regenerates(tmp_path: Path) -> None:
    out = generate(replace(SMALL, n_train=4, n_test=2), tmp_path / "ds")
    generate(replace(SMALL, n_train=6, n_test=2), out)
    assert json.loads((out / "manifest.json").read_text())["config"]["n_train"] == 6
    assert len(list(out.glob("train/smoke/*.png"))) + len(list(out.glob("train/clean/*.png"))) == 6


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match=r"mine.*expected an empty folder"):
        generate(SMALL, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_refuses_a_file_where_the_folder_goes(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile: is a file; expected an empty folder"):
        generate(SMALL, tmp_path / "afile")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 8),
        ("size", 96.0),
        ("n_train", True),
        ("n_test", 0),
        ("seed", -1),
        ("smoke_fraction", 1.5),
        ("smoke_fraction", 0.0),  # leaves no smoke image
        ("chimney_in_clean", -0.1),
        ("chimney_with_smoke", 1.1),
        ("decoupled_fraction", "half"),
        ("min_opacity", 0.0),
        ("max_opacity", 0.2),  # below min_opacity
        ("distractor_prob", 2),
        ("plume_scale", 0.0),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"synth\.{field}: expected .*got {value!r}"):
        SynthConfig(**{field: value})


def test_preview_grid(dataset: Path) -> None:
    grid = preview(dataset, n=4)
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 2, 3) and grid.dtype == np.uint8
    assert (grid[64:66] == 255).all()  # white gap between rows
    # Smoke contours are drawn in yellow on some tile.
    assert ((grid[..., 0] == 255) & (grid[..., 1] == 230) & (grid[..., 2] == 0)).any()
