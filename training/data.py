"""Reading and checking dataset folders, torch datasets, and cutting test windows.

Layout (the synthetic generator writes the same one):

    root/train/smoke/*   root/train/clean/*     images, label 1 / 0
    root/train/masks/<stem>.png                 optional smoke masks of training images
    root/train/context/<stem>.png               optional context masks of training images
    root/test/images/*                          images
    root/test/masks/<stem>.png                  smoke masks, required for every test image
    root/test/context/<stem>.png                optional context (e.g. chimney) masks

The training masks are never used to train; they score the validation split
(``data.val_fraction``, see ``training.validation``): held-out images with a mask
get CAM metrics, the others count for validation accuracy only.

Images may be .png .jpg .jpeg .bmp .tif .tiff (any case). Every reader raises
`DataError` naming the file and what was expected, so a bad file fails a sweep
before training starts; ``wsss data check`` reads a whole dataset and reports every
problem at once (`training.data_check`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from training.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = ".png"


def _images_in(folder: Path) -> list[Path]:
    """Sorted image files directly inside ``folder`` (sorting makes runs reproducible)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _require_images(folder: Path) -> list[Path]:
    files = _images_in(folder)
    if not files:
        state = "is empty" if folder.is_dir() else "does not exist"
        raise DataError(
            f"{folder} {state}: expected a folder with images ({' '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def scan_train(root: Path) -> list[tuple[Path, int]]:
    """List training images with labels: 1 for ``train/smoke``, 0 for ``train/clean``.

    Returns:
        (path, label) pairs, smoke first then clean, each sorted by file name.

    Raises:
        DataError: a class folder is missing or holds no images.
    """
    root = Path(root)
    smoke = _require_images(root / "train" / "smoke")
    clean = _require_images(root / "train" / "clean")
    return [(p, 1) for p in smoke] + [(p, 0) for p in clean]


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image and its masks (same file stem in every folder).

    Attributes:
        id: file stem, unique within the split.
        image: the RGB image.
        mask: the smoke mask, 0/255 single channel.
        context: the context (e.g. chimney) mask, or None when not provided.
        label: the image label when it is known apart from the mask (a held-out
            training image's folder); None: 1 when the mask has any pixel set.
    """

    id: str
    image: Path
    mask: Path
    context: Path | None
    label: int | None = None


def scan_test(root: Path) -> list[EvalItem]:
    """List test images with their masks, sorted by id.

    Raises:
        DataError: ``test/images`` is missing or empty, or an image has no mask.
    """
    test = Path(root) / "test"
    items = []
    for image in _require_images(test / "images"):
        mask = test / "masks" / f"{image.stem}{MASK_SUFFIX}"
        if not mask.is_file():
            raise DataError(f"{image} has no mask: expected {mask} (0/255, same stem, .png)")
        context = test / "context" / f"{image.stem}{MASK_SUFFIX}"
        items.append(EvalItem(image.stem, image, mask, context if context.is_file() else None))
    return items


def _decode(path: Path) -> np.ndarray:
    try:
        data = np.frombuffer(Path(path).read_bytes(), np.uint8)
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror})") from None
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise DataError(
            f"{path}: not a readable image (corrupt or unsupported format); expected "
            f"one of {' '.join(IMAGE_EXTENSIONS)}"
        )
    return array


def read_image(path: Path, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Read an image as RGB, keeping its bit depth visible so 16-bit files are refused.

    Grayscale images are converted to RGB (replicated channels); an alpha channel
    is dropped. EXIF orientation is ignored (pixels are used as stored). The pixel
    limit keeps giant frames out of training, where they would be resized to a few
    hundred pixels anyway; it is checked on the file header first, so a huge (or
    forged) header fails before gigabytes are decoded.

    Returns:
        H×W×3 uint8 RGB.

    Raises:
        DataError: unreadable/corrupt file, not 8-bit, or more than ``max_pixels``.
    """
    size = _header_size(path)
    if size is not None:
        _check_pixels(path, *size, max_pixels)
    array = _decode(path)
    if array.dtype != np.uint8:
        raise DataError(
            f"{path}: expected 8-bit RGB, got {array.dtype}; convert it, e.g. "
            f"`convert in.png -depth 8 out.png` or cv2.convertScaleAbs(img, alpha=255/65535)"
        )
    _check_pixels(path, array.shape[1], array.shape[0], max_pixels)
    channels = 1 if array.ndim == 2 else array.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels == 2:  # grey + alpha
        array, channels = np.ascontiguousarray(array[..., 0]), 1
    if channels not in codes:
        raise DataError(f"{path}: expected 1, 3 or 4 channels, got {channels}")
    return cv2.cvtColor(array, codes[channels])


def _check_pixels(path: Path, w: int, h: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise DataError(
            f"{path}: {w}×{h} = {h * w} pixels, expected at most {max_pixels}; cut it into "
            f"windows with `wsss data windows`"
        )


def _header_size(path: Path) -> tuple[int, int] | None:
    """(W, H) read from the file header without decoding; None when the header is not understood."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below says it better
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as err:  # PIL's own guard (~179 M pixels) fired first
        raise DataError(f"{path}: {err}; cut it into windows with `wsss data windows`") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # _decode reports unreadable files


def read_mask(path: Path, *, shape: tuple[int, int], image: Path | None = None) -> np.ndarray:
    """Read a binary mask stored as 0/255 (or 0/1) in one channel or three equal ones.

    Args:
        path: the mask file.
        shape: (H, W) of the image the mask belongs to.
        image: that image's path, only quoted in error messages.

    Returns:
        H×W bool, True where the mask is set.

    Raises:
        DataError: unreadable, several different channels, values other than
            {0, 255} / {0, 1}, or a size different from ``shape``.
    """
    array = _decode(path)
    if array.ndim == 3:
        first = array[..., 0]
        if any(not np.array_equal(first, array[..., c]) for c in range(1, min(3, array.shape[2]))):
            raise DataError(
                f"{path}: expected a single-channel mask (or 3 equal channels), "
                f"got {array.shape[2]} different channels",
                kind="mask_values",
            )
        array = first
    if array.shape != tuple(shape):
        of = f" of {image}" if image is not None else ""
        raise DataError(
            f"{path}: mask is {array.shape[1]}×{array.shape[0]} (W×H) but the "
            f"image{of} is {shape[1]}×{shape[0]}; expected the same size",
            kind="mask_size",
        )
    values = set(np.unique(array).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        odd = sorted(values - {0, 1, 255})[:8] or sorted(values)
        raise DataError(
            f"{path}: expected mask values {{0, 255}} (or {{0, 1}}), found unexpected values {odd}",
            kind="mask_values",
        )
    return array > 0


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"data.mean/std: expected 3 values each (R, G, B) with std > 0, "
            f"got mean={list(mean)} std={list(std)}"
        )
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    # INTER_AREA averages when shrinking (no aliasing); it degrades to nearest when enlarging.
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def to_tensor(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 RGB → 3×H×W float32, ``(x / 255 − mean) / std`` per channel."""
    x = (rgb.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class TrainDataset(torch.utils.data.Dataset):
    """Labelled training images, resized to a square input.

    Args:
        items: (path, label) pairs from `scan_train`.
        image_size: side S of the network input, px.
        mean: per-channel mean in [0, 1] units (RGB).
        std: per-channel std in [0, 1] units (RGB).
        augment: random horizontal flips, drawn from torch's global generator,
            which DataLoader seeds per worker.
        preload: decode all images once into S×S×3 uint8 memory (N·S²·3 bytes).
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        preload: bool = True,
    ) -> None:
        self.items = list(items)
        self.image_size = image_size
        self.mean, self.std = _check_norm(mean, std)
        self.augment = augment
        self._cache = [self._load(i) for i in range(len(self.items))] if preload else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> np.ndarray:
        return _resize(read_image(self.items[index][0]), self.image_size)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (3×S×S float32 normalised image, scalar float32 label)."""
        rgb = self._cache[index] if self._cache is not None else self._load(index)
        x = to_tensor(rgb, self.mean, self.std)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(float(self.items[index][1]))


class EvalDataset(torch.utils.data.Dataset):
    """Images with masks for CAM extraction, plus native-resolution access for evaluation:
    the test split (``test/``), or the scored part of a validation split.

    Args:
        items: from `scan_test` (or `training.validation.validation_items`).
        image_size: side S of the network input, or None to keep the native size.
        mean: per-channel mean in [0, 1] units (RGB).
        std: per-channel std in [0, 1] units (RGB).
    """

    def __init__(
        self,
        items: Sequence[EvalItem],
        *,
        image_size: int | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.items = list(items)
        self.image_size = image_size
        self.mean, self.std = _check_norm(mean, std)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns dict(image=3×S×S float32 (3×H×W if no image_size), id=str, label=int).

        The label is the item's own, or else 1 when the smoke mask has any pixel set.
        """
        rgb, mask, _ = self.load_eval(index, context=False)
        if self.image_size is not None:
            rgb = _resize(rgb, self.image_size)
        item = self.items[index]
        return {
            "image": to_tensor(rgb, self.mean, self.std),
            "id": item.id,
            "label": int(mask.any()) if item.label is None else item.label,
        }

    def load_eval(
        self, index: int, *, context: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Native-resolution data for evaluation.

        Returns:
            (H×W×3 uint8 RGB, H×W bool smoke mask, H×W bool context mask or None).
        """
        item = self.items[index]
        rgb = read_image(item.image)
        mask = read_mask(item.mask, shape=rgb.shape[:2], image=item.image)
        ctx = None
        if context and item.context is not None:
            ctx = read_mask(item.context, shape=rgb.shape[:2], image=item.image)
        return rgb, mask, ctx


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window offsets along one axis; the last window is aligned to the border.

    >>> window_starts(1100, 512, 512)
    [0, 512, 588]
    """
    starts = list(range(0, length - size + 1, stride))
    if starts and starts[-1] + size < length:
        starts.append(length - size)
    return starts


def cut_windows(
    src: Path, dst: Path, *, size: int = 512, stride: int = 512, min_smoke: float = 0.005
) -> int:
    """Cut every test image, mask and context mask of ``src`` into square windows.

    As in the thesis's evaluation (1920×1080 frames cut into 512×512 windows), only
    windows whose smoke fraction is at least ``min_smoke`` are written, to
    ``dst/test/{images,masks,context}/<stem>_y<y>_x<x>.png``. Images smaller than
    ``size`` are skipped with a logged warning. The train split is left alone: copy
    or link ``src/train`` yourself if ``dst`` should be a complete dataset.

    Returns:
        The number of windows written.

    Raises:
        ConfigError: non-positive size/stride, min_smoke outside [0, 1], or dst == src.
        DataError: from reading the test files.
    """
    if size <= 0 or stride <= 0 or not 0.0 <= min_smoke <= 1.0:
        raise ConfigError(
            f"windows: expected size > 0, stride > 0 and min_smoke in [0, 1], "
            f"got size={size} stride={stride} min_smoke={min_smoke}"
        )
    if Path(src).resolve() == Path(dst).resolve():
        raise ConfigError(f"windows: expected a destination different from the source {src}")
    dataset = EvalDataset(scan_test(src), image_size=None, mean=(0, 0, 0), std=(1, 1, 1))
    out = {name: Path(dst) / "test" / name for name in ("images", "masks", "context")}
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, item in enumerate(dataset.items):
        rgb, mask, ctx = dataset.load_eval(i)
        h, w = mask.shape
        if h < size or w < size:
            log.warning(
                "%s: %d×%d is smaller than the %d px window; skipped", item.image, w, h, size
            )
            continue
        for y in window_starts(h, size, stride):
            for x in window_starts(w, size, stride):
                window = (slice(y, y + size), slice(x, x + size))
                if mask[window].mean() < min_smoke:
                    continue
                name = f"{item.id}_y{y}_x{x}.png"
                cv2.imwrite(str(out["images"] / name), cv2.cvtColor(rgb[window], cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(out["masks"] / name), mask[window].astype(np.uint8) * 255)
                if ctx is not None:
                    cv2.imwrite(str(out["context"] / name), ctx[window].astype(np.uint8) * 255)
                written += 1
    return written
