"""Dataset folders: scanning, every DataError case, torch datasets, windowing."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.data import (
    EvalDataset,
    EvalItem,
    TrainDataset,
    cut_windows,
    read_image,
    read_mask,
    scan_test,
    scan_train,
    window_starts,
)
from training.data_check import SHOWN_PER_KIND, check_dataset
from training.errors import ConfigError, DataError
from training.synth import SynthConfig, generate

MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _write_raw(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    if box:
        y0, y1, x0, x1 = box
        mask[y0:y1, x0:x1] = 255
    return mask


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tiny dataset: 2 smoke + 1 clean train images, 2 test images (one with context)."""
    _write_rgb(tmp_path / "train/smoke/b.PNG", _rgb(20, 30, 1))
    _write_rgb(tmp_path / "train/smoke/a.jpg", _rgb(20, 30, 2))
    _write_rgb(tmp_path / "train/clean/c.bmp", _rgb(16, 16, 3))
    (tmp_path / "train/clean/notes.txt").write_text("not an image")
    _write_rgb(tmp_path / "test/images/t1.png", _rgb(24, 32, 4))
    _write_raw(tmp_path / "test/masks/t1.png", _mask(24, 32, (4, 10, 5, 15)))
    _write_raw(tmp_path / "test/context/t1.png", _mask(24, 32, (20, 24, 0, 3)))
    _write_rgb(tmp_path / "test/images/t2.tif", _rgb(24, 32, 5))
    _write_raw(tmp_path / "test/masks/t2.png", _mask(24, 32))
    return tmp_path


# --------------------------------------------------------------------------- scanning


def test_scan_train_labels_sorted_and_extensions(root: Path) -> None:
    items = scan_train(root)
    assert [(p.name, label) for p, label in items] == [("a.jpg", 1), ("b.PNG", 1), ("c.bmp", 0)]


@pytest.mark.parametrize("folder", ["smoke", "clean"])
def test_scan_train_missing_or_empty_class_folder(root: Path, folder: str) -> None:
    for f in (root / "train" / folder).iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"train/{folder} is empty: expected a folder with images"):
        scan_train(root)
    (root / "train" / folder).rmdir()
    with pytest.raises(DataError, match=rf"train/{folder} does not exist: expected"):
        scan_train(root)


def test_scan_test_pairs_masks_and_optional_context(root: Path) -> None:
    items = scan_test(root)
    assert [i.id for i in items] == ["t1", "t2"]
    assert items[0].mask == root / "test/masks/t1.png"
    assert items[0].context == root / "test/context/t1.png"
    assert items[1].context is None


def test_scan_test_missing_mask_names_image_and_expected_path(root: Path) -> None:
    (root / "test/masks/t2.png").unlink()
    with pytest.raises(DataError) as err:
        scan_test(root)
    assert "t2.tif has no mask" in str(err.value)
    assert f"expected {root / 'test/masks/t2.png'}" in str(err.value)


def test_scan_test_missing_images_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test/images does not exist: expected a folder"):
        scan_test(tmp_path)


# --------------------------------------------------------------------------- reading


def test_read_image_returns_rgb_in_order(tmp_path: Path) -> None:
    rgb = _rgb(5, 7)
    np.testing.assert_array_equal(read_image(_write_rgb(tmp_path / "x.png", rgb)), rgb)


def test_corrupt_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage, not an image at all")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image .*expected one of"):
        read_image(bad)
    with pytest.raises(DataError, match=r"missing\.png: cannot read the file"):
        read_image(tmp_path / "missing.png")


def test_16_bit_image_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "deep.png", np.full((4, 4, 3), 40000, np.uint16))
    with pytest.raises(DataError, match=r"deep\.png: expected 8-bit RGB, got uint16; convert it"):
        read_image(path)


def test_grayscale_becomes_rgb_and_alpha_is_dropped(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_write_raw(tmp_path / "g.png", gray))
    assert out.shape == (3, 4, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    rgb = _rgb(3, 4)
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((3, 4), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(_write_raw(tmp_path / "a.png", bgra)), rgb)


def test_too_many_pixels_suggests_windows(tmp_path: Path) -> None:
    path = _write_rgb(tmp_path / "huge.png", _rgb(10, 20))
    with pytest.raises(
        DataError, match=r"huge\.png: 20×10 = 200 pixels, expected at most 199.*wsss data windows"
    ):
        read_image(path, max_pixels=199)


@pytest.mark.parametrize(
    "stored",
    [
        _mask(4, 5, (1, 3, 1, 4)),
        _mask(4, 5, (1, 3, 1, 4)) // 255,  # {0, 1}
        np.dstack([_mask(4, 5, (1, 3, 1, 4))] * 3),  # 3 equal channels
    ],
)
def test_read_mask_accepted_encodings(tmp_path: Path, stored: np.ndarray) -> None:
    mask = read_mask(_write_raw(tmp_path / "m.png", stored), shape=(4, 5))
    assert mask.dtype == bool and mask.sum() == 6 and mask[1:3, 1:4].all()


def test_non_binary_mask_lists_unexpected_values(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "soft.png", np.array([[0, 128], [255, 3]], np.uint8))
    with pytest.raises(DataError, match=r"soft\.png: expected mask values \{0, 255\}.*\[3, 128\]"):
        read_mask(path, shape=(2, 2))


def test_mask_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "m.png", _mask(4, 5))
    with pytest.raises(
        DataError, match=r"m\.png: mask is 5×4 \(W×H\) but the image of img\.png is 6×3"
    ):
        read_mask(path, shape=(3, 6), image=Path("img.png"))


def test_colour_mask_is_refused(tmp_path: Path) -> None:
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (0, 0, 255)
    with pytest.raises(DataError, match=r"c\.png: expected a single-channel mask"):
        read_mask(_write_raw(tmp_path / "c.png", colour), shape=(2, 2))


# --------------------------------------------------------------------------- datasets


def test_train_dataset_normalises_and_resizes(root: Path) -> None:
    ds = TrainDataset(scan_train(root), image_size=8, mean=MEAN, std=STD)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.float32 and y.item() == 1.0 and ds[2][1].item() == 0.0
    rgb = cv2.resize(read_image(ds.items[0][0]), (8, 8), interpolation=cv2.INTER_AREA)
    expected = (rgb[..., 1].astype(np.float32) / 255 - 0.25) / 0.25
    np.testing.assert_allclose(x[1].numpy(), expected, rtol=1e-6)
    lazy = TrainDataset(scan_train(root), image_size=8, mean=MEAN, std=STD, preload=False)
    assert torch.equal(lazy[1][0], ds[1][0])


def test_train_dataset_flips_are_seeded(root: Path) -> None:
    ds = TrainDataset(scan_train(root), image_size=8, mean=MEAN, std=STD, augment=True)
    plain = TrainDataset(scan_train(root), image_size=8, mean=MEAN, std=STD)[0][0]

    def draws() -> list[bool]:
        torch.manual_seed(0)
        return [torch.equal(ds[0][0], plain.flip(-1)) for _ in range(20)]

    first = draws()
    assert first == draws()
    assert 0 < sum(first) < 20  # both flipped and unflipped samples occur


def test_bad_normalisation_is_a_config_error(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.mean/std: expected 3 values"):
        TrainDataset(scan_train(root), image_size=8, mean=(0.5,), std=STD)


def test_test_dataset_items_and_eval_access(root: Path) -> None:
    ds = EvalDataset(scan_test(root), image_size=16, mean=MEAN, std=STD)
    first = ds[0]
    assert first["image"].shape == (3, 16, 16) and first["id"] == "t1" and first["label"] == 1
    assert ds[1]["label"] == 0
    rgb, mask, ctx = ds.load_eval(0)
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8
    assert mask.dtype == bool and mask.sum() == 6 * 10
    assert ctx is not None and ctx.sum() == 4 * 3
    assert ds.load_eval(1)[2] is None
    native = EvalDataset(scan_test(root), image_size=None, mean=MEAN, std=STD)
    assert native[0]["image"].shape == (3, 24, 32)


def test_test_item_fields(tmp_path: Path) -> None:
    item = EvalItem("x", tmp_path / "x.png", tmp_path / "m.png", None)
    assert (item.id, item.context) == ("x", None)


def test_check_dataset_summary(root: Path) -> None:
    report = check_dataset(root)
    assert report.ok and report.files == 3 + 2 + 2 + 1  # train images, test images, masks, context
    assert report.summary["train"] == {"smoke": 2, "clean": 1}
    assert report.summary["test"] == {"images": 2, "smoke": 1, "clean": 1, "with_context": 1}
    assert report.summary["sizes"] == {"train": {"30×20": 2, "16×16": 1}, "test": {"32×24": 2}}
    assert report.render().endswith("no problems found")


def test_check_dataset_reads_on_after_a_bad_file(root: Path) -> None:
    """A corrupt training image is one problem; every other file is still read and counted."""
    (root / "train/clean/c.bmp").write_bytes(b"BM not really")
    report = check_dataset(root)
    (problem,) = report.problems
    assert problem.kind == "unreadable_image" and problem.path.name == "c.bmp"
    assert problem.detail.startswith("not a readable image")
    assert report.summary["train"] == {"smoke": 2, "clean": 0} and report.summary["test"]["images"] == 2


def test_check_dataset_lists_a_few_paths_per_kind_and_counts_the_rest(root: Path) -> None:
    for i in range(SHOWN_PER_KIND + 2):
        (root / f"train/smoke/bad{i}.png").write_bytes(b"not a png")
    text = check_dataset(root).render()
    assert f"unreadable image: {SHOWN_PER_KIND + 2} (expected" in text
    assert text.count("bad") == SHOWN_PER_KIND and "… and 2 more" in text


def test_check_accepts_the_synthetic_benchmark(tmp_path: Path) -> None:
    out = generate(SynthConfig(size=32, n_train=6, n_test=8, seed=1), tmp_path / "synth")
    report = check_dataset(out)
    assert report.ok
    assert report.summary["train"]["smoke"] + report.summary["train"]["clean"] == 6
    assert report.summary["test"]["images"] == report.summary["test"]["with_context"] == 8
    assert report.summary["sizes"]["test"] == {"32×32": 8}


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("length", "size", "stride", "starts"),
    [
        (1100, 512, 512, [0, 512, 588]),
        (700, 512, 512, [0, 188]),
        (1024, 512, 512, [0, 512]),
        (512, 512, 256, [0]),
        (1000, 512, 256, [0, 256, 488]),
        (300, 512, 512, []),
    ],
)
def test_window_starts(length: int, size: int, stride: int, starts: list[int]) -> None:
    assert window_starts(length, size, stride) == starts


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """One 1100×700 test image with two smoke blobs, a chimney mask, and one tiny image."""
    src = tmp_path / "src"
    rgb = _rgb(700, 1100, 9)
    mask = _mask(700, 1100, (50, 150, 50, 150))  # 10 000 px, only in window (0, 0)
    mask[600:680, 1000:1090] = 255  # 7200 px in (188, 588); 24 columns (1920 px) in (188, 512)
    _write_rgb(src / "test/images/frame.png", rgb)
    _write_raw(src / "test/masks/frame.png", mask)
    _write_raw(src / "test/context/frame.png", _mask(700, 1100, (0, 700, 0, 10)))
    _write_rgb(src / "test/images/small.png", _rgb(300, 400))
    _write_raw(src / "test/masks/small.png", _mask(300, 400, (0, 300, 0, 400)))
    return src


def test_cut_windows_keeps_windows_with_enough_smoke(
    big: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dst = tmp_path / "dst"
    with caplog.at_level(logging.WARNING, logger="training.data"):
        n = cut_windows(big, dst, size=512, stride=512, min_smoke=0.005)
    # 1920 / 512² = 0.73% ≥ 0.5%: the partly covered (188, 512) window is kept.
    names = sorted(p.name for p in (dst / "test/images").iterdir())
    assert names == ["frame_y0_x0.png", "frame_y188_x512.png", "frame_y188_x588.png"] and n == 3
    assert "small.png" in caplog.text and "smaller than the 512 px window" in caplog.text
    src_rgb = read_image(big / "test/images/frame.png")
    window = read_image(dst / "test/images/frame_y188_x588.png")
    np.testing.assert_array_equal(window, src_rgb[188:700, 588:1100])
    mask = read_mask(dst / "test/masks/frame_y188_x588.png", shape=(512, 512))
    assert mask.sum() == 80 * 90
    ctx = read_mask(dst / "test/context/frame_y0_x0.png", shape=(512, 512))
    assert ctx.sum() == 512 * 10
    assert scan_test(dst)[0].context is not None  # the output is itself a valid test split


def test_cut_windows_threshold_and_all_windows(big: Path, tmp_path: Path) -> None:
    assert cut_windows(big, tmp_path / "strict", min_smoke=0.01) == 2  # drops the 0.73% window
    assert cut_windows(big, tmp_path / "all", min_smoke=0.0) == 6  # 2 rows × 3 columns


def test_cut_windows_rejects_bad_arguments(big: Path) -> None:
    with pytest.raises(ConfigError, match=r"stride=0"):
        cut_windows(big, big.parent / "x", stride=0)
    with pytest.raises(ConfigError, match=r"different from the source"):
        cut_windows(big, big)
