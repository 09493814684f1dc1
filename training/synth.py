"""Synthetic smoke benchmark with the thesis's co-occurrence flaw built in.

Every smoke image in the training split (and in the "coupled" test subset) shows
the chimney the plume rises from; clean images show a chimney only with
probability ``chimney_in_clean``. A classifier can therefore reach high training
accuracy by detecting chimneys instead of smoke. The "decoupled" test subset
breaks the correlation (smoke with its chimney out of frame, chimneys without
smoke), so a model that learned the shortcut fails there and its CAMs light up
chimneys; ``test/context`` holds the chimney masks to measure exactly that.

``chimney_with_smoke`` < 1 hides the chimney of some training plumes: with 0.5
and ``chimney_in_clean`` 0.5 the chimney says nothing about the class in the
training split (the known-answer control: a teacher without the shortcut).

The folder layout is the one real data uses (see ``training.data``):

    out/train/smoke/*.png  out/train/clean/*.png   H×W×3 uint8 RGB
    out/train/masks/*.png  out/train/context/*.png smoke / chimney masks of every training
                                                   image (scored when it is held out for validation)
    out/test/images/*.png  out/test/masks/*.png    masks H×W uint8 in {0, 255}
    out/test/context/*.png                         chimney masks, {0, 255}
    out/manifest.json                              config + per-image metadata

Smoke mask rule: a pixel is smoke where compositing the plume changed it by at
least ``MIN_CHANGE`` (12 of 255) grey levels on average over RGB, i.e. where a
viewer can see the plume; fainter fringes count as background. Haze drawn in
front afterwards is ignored by the rule.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.config.data import SynthConfig
from training.errors import DataError

# Bump when the rendering or the files written change, so cached datasets are rebuilt.
# 4: training images get their masks (train/masks, train/context); pixels as in 3.
GENERATOR_VERSION = 4
MIN_CHANGE = 12.0
# Decoupled smoke: share of plumes whose chimney is hidden below the bottom edge (the rest
# enter from a side edge). A plume rising from below the frame has the same shape as a coupled
# one, so the decoupled subset tests "smoke without its chimney", not an unseen plume shape.
BOTTOM_ENTRY = 0.8
_SPLIT_CODES = {"train": 0, "test": 1}
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # much faster than the default, files a bit larger
Point = tuple[float, float]


@dataclass(frozen=True)
class ImageSpec:
    """What one image must show; decided before rendering so order does not matter.

    Attributes:
        split: "train" or "test".
        index: position within the split; with the seed it keys the image's RNG.
        id: file stem, e.g. "test_00012".
        smoke: whether a plume is visible.
        chimney: whether a chimney is visible.
        subset: "coupled" or "decoupled" ("coupled" for all training images).
    """

    split: str
    index: int
    id: str
    smoke: bool
    chimney: bool
    subset: str


def plan(cfg: SynthConfig, split: str) -> list[ImageSpec]:
    """Decide class, chimney and subset of every image of ``split``.

    Class counts are exact (rounded fractions); the order is a seeded shuffle so
    ids do not reveal the class. Chimneys in clean images, and in training smoke
    images when ``chimney_with_smoke`` < 1, are a per-image draw from a side stream,
    so the rendering of every other image is unchanged.
    """
    code = _SPLIT_CODES[split]
    n = cfg.n_train if split == "train" else cfg.n_test
    n_dec = 0 if split == "train" else round(n * cfg.decoupled_fraction)
    n_cpl = n - n_dec
    n_smoke = round(n_cpl * cfg.smoke_fraction)
    n_dec_smoke = (n_dec + 1) // 2
    kinds = (
        [("coupled", True)] * n_smoke
        + [("coupled", False)] * (n_cpl - n_smoke)
        + [("decoupled", True)] * n_dec_smoke
        + [("decoupled", False)] * (n_dec - n_dec_smoke)
    )
    order = np.random.default_rng([cfg.seed, code]).permutation(n)
    specs = []
    for index in range(n):
        subset, smoke = kinds[order[index]]
        if subset == "decoupled":
            chimney = not smoke
        elif smoke and split == "test":
            chimney = True  # the deliberate flaw: coupled smoke always shows its source
        else:
            share = cfg.chimney_with_smoke if smoke else cfg.chimney_in_clean
            chimney = bool(_image_rng(cfg, split, index, stream=1).random() < share)
        specs.append(ImageSpec(split, index, f"{split}_{index:05d}", smoke, chimney, subset))
    return specs


def _image_rng(
    cfg: SynthConfig, split: str, index: int, *, stream: int | None = None
) -> np.random.Generator:
    """The RNG of one image: a function of (seed, split, index) only, so images can be
    rendered in any order or in parallel. ``stream`` gives independent side draws."""
    key = [cfg.seed, _SPLIT_CODES[split], index] + ([] if stream is None else [stream])
    return np.random.default_rng(key)


# --------------------------------------------------------------------------- rendering


def _fractal_noise(rng: np.random.Generator, s: int, *, cells: int, octaves: int) -> np.ndarray:
    """s×s float32 in [0, 1]: summed bicubic-upsampled random grids, halving amplitude."""
    out = np.zeros((s, s), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        out += amp * cv2.resize(grid, (s, s), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp, cells = amp * 0.55, cells * 2
    out -= out.min()
    return out / max(float(out.max()), 1e-6)


# Sky presets: (top colour low/high, horizon colour low/high, light level for smoke/buildings).
_SKIES = {
    "bright": (([40, 100, 190], [110, 170, 250]), ([170, 195, 220], [225, 235, 255]), 1.0),
    "overcast": (([125, 125, 125], [185, 185, 190]), ([165, 165, 165], [225, 225, 230]), 0.9),
    "dusk": (([25, 30, 70], [80, 80, 140]), ([200, 110, 60], [255, 180, 130]), 0.65),
}


def _sky(rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """Vertical-gradient sky, s×s×3 float32 RGB in [0, 255], and its light level."""
    top_range, horizon_range, light = _SKIES[str(rng.choice(list(_SKIES)))]
    top, horizon = rng.uniform(*top_range), rng.uniform(*horizon_range)
    gain = rng.uniform(0.8, 1.1)
    t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None] ** rng.uniform(0.6, 1.6)
    sky = (top * (1 - t) + horizon * t) * gain
    sky = sky + (_fractal_noise(rng, s, cells=2, octaves=2)[..., None] - 0.5) * 12
    return np.ascontiguousarray(np.broadcast_to(sky, (s, s, 3)), np.float32), light * gain


def _skyline(rng: np.random.Generator, img: np.ndarray, light: float) -> None:
    """Dark building silhouettes along the bottom edge, drawn in place."""
    s = img.shape[0]
    base = rng.uniform(25, 75) * light
    x = int(rng.integers(-s // 10, 1))
    while x < s:
        w = int(rng.integers(max(3, s // 16), s // 5))
        h = int(rng.uniform(0.06, 0.27) * s)
        colour = np.clip(base + rng.uniform(-12, 12, 3), 0, 255)
        img[s - h :, max(x, 0) : x + w] = colour
        if rng.random() < 0.5:  # lit windows: small bright dots give the skyline texture
            win = rng.uniform(120, 230, 3) * light
            for wy in range(s - h + 3, s - 2, max(3, s // 24)):
                for wx in range(max(x, 0) + 2, min(x + w, s) - 1, max(3, s // 24)):
                    if rng.random() < 0.35:
                        img[wy, wx] = win
        x += w


def _chimney(
    rng: np.random.Generator, img: np.ndarray, x_centre: float, light: float
) -> tuple[np.ndarray, Point]:
    """Draw a tall thin chimney on the ground; returns its s×s bool mask and top centre (x, y)."""
    s = img.shape[0]
    w_top = max(3.0, rng.uniform(0.03, 0.045) * s)
    w_bot, h = w_top * rng.uniform(1.1, 1.4), rng.uniform(0.38, 0.6) * s
    y_top = s - h
    xs = x_centre + np.array([-w_bot, -w_top, w_top, w_bot]) / 2
    poly = np.stack([xs, [s, y_top, y_top, s]], axis=1).round().astype(np.int32)
    mask = cv2.fillPoly(np.zeros((s, s), np.uint8), [poly], 1).astype(bool)
    rows = np.arange(s, dtype=np.float32)[:, None].repeat(s, 1)
    style = rng.choice(["striped", "brick", "concrete"])
    if style == "striped":  # red/white bands, as on real industrial stacks
        band = (np.floor((rows - y_top) / max(2.0, h / rng.integers(5, 9))) % 2)[..., None]
        colour = np.where(band == 0, [200, 40, 35], [235, 235, 230])
    elif style == "brick":
        courses = 0.85 + 0.15 * ((rows // 2) % 2)[..., None]  # mortar lines every other row
        colour = np.array([150, 70, 50]) * rng.uniform(0.8, 1.15) * courses
    else:
        colour = np.broadcast_to(rng.uniform(110, 175) + rng.uniform(-6, 6, 3), (s, s, 3))
    img[mask] = colour[mask] * light
    return mask, (x_centre, y_top)


def _plume_alpha(
    rng: np.random.Generator, s: int, src: Point, wind: float, max_bend: float, cfg: SynthConfig
) -> np.ndarray:
    """s×s float32 alpha of one plume rising from ``src`` (which may lie outside the frame).

    The path leaves the source upright and bends up to ``max_bend`` degrees towards
    ``wind`` (±1); it widens and fades as it rises.
    """
    length = rng.uniform(0.55, 1.0) * s * cfg.plume_scale
    bend = math.radians(rng.uniform(0.0, max_bend)) * wind
    t = np.linspace(0.0, 1.0, 40)
    angle = bend * (1 - np.exp(-3 * t)) / (1 - math.exp(-3))
    xs = src[0] + np.cumsum(np.sin(angle) * length / len(t))
    ys = src[1] - np.cumsum(np.cos(angle) * length / len(t))
    w0, w1 = 0.03 * s * cfg.plume_scale, rng.uniform(0.09, 0.17) * s * cfg.plume_scale
    sigma = w0 + (w1 - w0) * t**0.7
    peak = rng.uniform(cfg.min_opacity, cfg.max_opacity)
    opacity = peak * (1 - rng.uniform(0.3, 0.8) * t**1.5)  # thins out towards the faint tail
    # Domain warping by noise makes billowy, irregular edges unlike the smooth clouds; it
    # fades out towards the source so the plume stays attached to its chimney.
    warp = 0.07 * s * cfg.plume_scale
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    far = np.clip(np.hypot(xx - src[0], yy - src[1]) / (0.25 * s), 0.1, 1.0)
    xx += (_fractal_noise(rng, s, cells=4, octaves=3) - 0.5) * 2 * warp * far
    yy += (_fractal_noise(rng, s, cells=4, octaves=3) - 0.5) * 2 * warp * far
    env = np.zeros((s, s), np.float32)
    for xi, yi, si, oi in zip(*(a.tolist() for a in (xs, ys, sigma, opacity)), strict=True):
        # Only the window where the blob exceeds ~1e-3 is touched: ~10× faster than full frames.
        reach = 2.6 * si + warp
        y0, y1 = max(0, int(yi - reach)), min(s, int(yi + reach) + 1)
        x0, x1 = max(0, int(xi - reach)), min(s, int(xi + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        r2 = ((xx[y0:y1, x0:x1] - xi) ** 2 + (yy[y0:y1, x0:x1] - yi) ** 2) * (1.0 / (si * si))
        blob = oi * np.exp(-0.5 * r2 * np.sqrt(r2))  # flatter core, sharper edge than a Gaussian
        np.maximum(env[y0:y1, x0:x1], blob, out=env[y0:y1, x0:x1])
    texture = _fractal_noise(rng, s, cells=6, octaves=4)
    return env * (1 - 0.65 * far * (1 - texture))  # dense at the mouth, patchy further up


def _composite(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    img *= 1 - alpha[..., None]
    img += alpha[..., None] * colour


def _smoke_colour(rng: np.random.Generator, img: np.ndarray, light: float) -> np.ndarray:
    """s×s×3 float32 grey-white (or dark grey) smoke colour with brighter billow tops.

    The grey level is drawn to differ from the sky's mean brightness by at least 50,
    as real plumes are seen because they contrast with the sky behind them.
    """
    s = img.shape[0]
    sky, lit = float(img[: s // 2].mean()), 0.75 + 0.25 * light  # dim light dims the smoke too
    greys = rng.uniform(70, 245, 20) * lit
    contrasting = greys[np.abs(greys - sky) >= 50]
    grey = contrasting[0] if contrasting.size else greys[np.argmax(np.abs(greys - sky))]
    shade = 0.8 + 0.35 * _fractal_noise(rng, s, cells=5, octaves=3)
    colour = (grey + rng.uniform(-10, 10, 3)) * shade[..., None]
    return np.clip(colour, 0, 255).astype(np.float32)


def _smoke_mask(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """s×s bool: where compositing ``colour`` with ``alpha`` over ``img`` is visible."""
    return alpha * np.abs(colour - img).mean(axis=-1) >= MIN_CHANGE


def _clouds(rng: np.random.Generator, img: np.ndarray, light: float) -> None:
    """Smooth, horizontally elongated grey blobs high in the sky (a distractor)."""
    s = img.shape[0]
    alpha = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, s), rng.uniform(0.05, 0.45) * s
        for _ in range(int(rng.integers(3, 7))):
            centre = (
                int(cx + rng.uniform(-0.15, 0.15) * s),
                int(cy + rng.uniform(-0.04, 0.04) * s),
            )
            axes = (int(rng.uniform(0.07, 0.18) * s), int(rng.uniform(0.025, 0.06) * s))
            cv2.ellipse(alpha, centre, axes, 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.035 * s) * rng.uniform(0.3, 0.75)
    grey = rng.uniform(150, 240) * light + rng.uniform(-10, 10, 3)
    _composite(img, alpha, grey.astype(np.float32))


def _haze(rng: np.random.Generator, img: np.ndarray, light: float) -> None:
    """Low-contrast veil, denser near the horizon (a distractor)."""
    s = img.shape[0]
    amount = rng.uniform(0.15, 0.4) * (0.6 + 0.4 * np.linspace(0, 1, s, dtype=np.float32))[:, None]
    colour = (rng.uniform(160, 220) * light + rng.uniform(-8, 8, 3)).astype(np.float32)
    _composite(img, np.broadcast_to(amount, (s, s)), colour)


def _plume_source(
    rng: np.random.Generator, s: int, top: Point | None
) -> tuple[Point, float, float]:
    """Where the plume starts, the wind sign and the largest bend (degrees)."""
    wind = float(rng.choice([-1.0, 1.0]))
    if top is not None:
        return top, wind, 70.0
    if rng.random() < BOTTOM_ENTRY:  # chimney hidden below the frame: the plume enters from the bottom
        return (rng.uniform(0.15, 0.85) * s, rng.uniform(1.02, 1.15) * s), wind, 45.0
    x = -0.04 * s if wind > 0 else 1.04 * s  # enters from a side edge, blown into the frame
    return (x, rng.uniform(0.55, 0.9) * s), wind, 80.0


def render(cfg: SynthConfig, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image.

    Returns:
        (image s×s×3 uint8 RGB, smoke mask s×s bool, chimney mask s×s bool).
    """
    rng = _image_rng(cfg, spec.split, spec.index)
    s = cfg.size
    img, light = _sky(rng, s)
    distractor = rng.random() < cfg.distractor_prob
    kind = rng.choice(["clouds", "haze", "both"], p=[0.5, 0.3, 0.2]) if distractor else "none"
    if kind in ("clouds", "both"):
        _clouds(rng, img, light)
    _skyline(rng, img, light)
    if kind in ("haze", "both"):  # a distant veil: the stack and its plume are in front of it
        _haze(rng, img, light)
    chimney = np.zeros((s, s), bool)
    top = None
    if spec.chimney:
        chimney, top = _chimney(rng, img, rng.uniform(0.15, 0.85) * s, light)
    smoke = np.zeros((s, s), bool)
    if spec.smoke:
        colour = _smoke_colour(rng, img, light)
        alpha = _visible_plume(rng, img, colour, cfg, top)
        smoke = _smoke_mask(img, alpha, colour)
        _composite(img, alpha, colour)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # sensor noise: no flat regions
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), smoke, chimney


def _visible_plume(
    rng: np.random.Generator,
    img: np.ndarray,
    colour: np.ndarray,
    cfg: SynthConfig,
    top: Point | None,
) -> np.ndarray:
    """Draw plumes until one visibly covers enough of the frame (a label a viewer could verify)."""
    s = img.shape[0]
    min_area = max(0.02 * cfg.plume_scale**2, 0.004) * s * s
    best, best_area = None, -1
    for _ in range(30):
        alpha = _plume_alpha(rng, s, *_plume_source(rng, s, top), cfg)
        area = int(_smoke_mask(img, alpha, colour).sum())
        if area > best_area:
            best, best_area = alpha, area
        if area >= min_area:
            break
    return best


# --------------------------------------------------------------------------- writing


def generate(cfg: SynthConfig, out: Path) -> Path:
    """Write the benchmark to ``out`` (layout in the module docstring); returns ``out``.

    Reuses ``out`` when its manifest holds the same config and generator version.
    Writes into a sibling temporary folder and renames it, so an interrupted or
    concurrent run never leaves a half-written dataset behind.

    Raises:
        DataError: ``out`` is a file, or a folder neither empty nor a generated dataset.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; expected an empty folder or a generated synthetic dataset")
    if _is_cached(cfg, out):
        return out
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise DataError(
            f"{out}: expected an empty folder or a generated synthetic dataset "
            "(with manifest.json); refusing to overwrite other files"
        )
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, subs in (("train", ("smoke", "clean", "masks", "context")), ("test", ("images", "masks", "context"))):
        for sub in subs:
            (tmp / split / sub).mkdir(parents=True)
    manifest: dict[str, Any] = {"config": asdict(cfg), "generator_version": GENERATOR_VERSION}
    for split in ("train", "test"):
        manifest[split] = [_write_one(cfg, spec, tmp) for spec in plan(cfg, split)]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if not _is_cached(cfg, out):  # a concurrent run may have finished first: keep its copy
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_cached(cfg, out):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_cached(cfg: SynthConfig, out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    same = manifest.get("config") == asdict(cfg)
    return same and manifest.get("generator_version") == GENERATOR_VERSION


def _write_one(cfg: SynthConfig, spec: ImageSpec, root: Path) -> dict[str, Any]:
    image, smoke, chimney = render(cfg, spec)
    name = f"{spec.id}.png"
    files = {
        f"train/{'smoke' if spec.smoke else 'clean'}/{name}": image,
        f"train/masks/{name}": smoke,
        f"train/context/{name}": chimney,
    }
    if spec.split == "test":
        files = {
            f"test/images/{name}": image,
            f"test/masks/{name}": smoke,
            f"test/context/{name}": chimney,
        }
    for rel, array in files.items():
        pixels = (
            cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array * np.uint8(255)
        )
        cv2.imwrite(str(root / rel), pixels, _PNG_FAST)
    record = {"id": spec.id, "smoke": spec.smoke, "chimney": spec.chimney}
    return record if spec.split == "train" else {**record, "subset": spec.subset}


def preview(out: Path, n: int = 16) -> np.ndarray:
    """Grid of test images with smoke (yellow) and chimney (red) mask contours.

    Picks ``n`` images evenly spread over the manifest's test list, so both
    subsets and classes appear.

    Returns:
        H×W×3 uint8 RGB grid, ceil(sqrt(n)) columns, 2 px white gaps.
    """
    out = Path(out)
    tests = json.loads((out / "manifest.json").read_text())["test"]
    picks = [tests[i]["id"] for i in np.linspace(0, len(tests) - 1, min(n, len(tests))).astype(int)]
    tiles = []
    for stem in picks:
        tile = cv2.cvtColor(cv2.imread(str(out / "test/images" / f"{stem}.png")), cv2.COLOR_BGR2RGB)
        for folder, colour in (("masks", (255, 230, 0)), ("context", (255, 0, 0))):
            mask = cv2.imread(str(out / "test" / folder / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            binary = (mask > 0).astype(np.uint8)
            contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, colour, 1)
        tiles.append(tile)
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[:2]
    grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = tile
    return grid
