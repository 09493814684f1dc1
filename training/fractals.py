"""A formula-driven pre-training corpus: K fractal classes, N rendered instances each.

Each class is one iterated function system (IFS): a few contractive affine maps
``p ↦ A_k p + b_k`` whose attractor is the class's shape (FractalDB, Kataoka et
al., ACCV 2020; used for ViTs by Nakashima et al., AAAI 2022). Nothing here is
drawn from the smoke task: no sky, no plumes, no chimneys, only coloured point
sets on flat dark backgrounds.

How a class is drawn. Maps are sampled in their singular-value form
``A = R(θ) diag(σ1, σ2) R(φ) D`` with the "σ-factor" rule of Anderson & Farrell
(WACV 2022, "Improving fractal pre-training"): the weighted sum Σ(σ1 + 2σ2) over
the maps is fixed to a value in ``[(5 + n) / 2, (6 + n) / 2]`` for ``n`` maps,
which keeps every map contractive (σ ≤ 1) and the shapes neither dust nor blobs.
FractalDB's filling-rate filter then rejects systems whose attractor covers less
than ``min_fill`` of the canvas (lines, points). Map probabilities are
proportional to ``|det A|``, as in FractalDB.

How an instance varies. Each instance perturbs its class's maps slightly
(``jitter``; FractalDB's per-parameter weights play this role) and is placed with
its own scale, rotation, mirror, position, colours and background. Points are
coloured by the map that produced them, so each image shows the self-similar
parts of the shape and their boundaries (contours matter most for what a ViT
learns from such data: Kataoka et al., CVPR 2022).

Rendering is the chaos game run for all chains of a batch of images at once
(numpy, one core). Chains start at the fixed point of a map, which lies on the
attractor, so a short burn-in suffices. Every image has its own RNG, keyed by
(seed, class, instance), so the corpus does not depend on batching or order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.atomic import atomic_path
from training.config.pretrain import FractalConfig
from training.errors import ConfigError, DataError

GENERATOR_VERSION = 1  # bump when rendering changes, so cached corpora are rebuilt
_BURN_IN = 6  # chain steps dropped: chains start on the attractor, this only spreads them out
_KEPT_STEPS = 16  # chain steps rasterised per chain
_CANDIDATES = 32  # systems rendered per batch while searching for classes
_CHUNK = 128  # images rendered per vectorised batch (bounds memory at ~100 MB for 64 px)
CORPUS_FILE = "corpus.npz"


@dataclass(frozen=True)
class IfsSystem:
    """One IFS in singular-value form; ``n`` maps, padded maps have probability 0.

    Attributes:
        sv: n×2 singular values (σ1 ≥ σ2) in [0, 1).
        angles: n×2 rotations (θ, φ), radians.
        signs: n×2 diagonal signs of D, ±1.
        shift: n×2 translations b.
    """

    sv: np.ndarray
    angles: np.ndarray
    signs: np.ndarray
    shift: np.ndarray

    def matrices(self) -> np.ndarray:
        """n×2×2 linear parts ``R(θ) diag(σ) R(φ) D``."""
        return _rot(self.angles[:, 0]) @ (self.sv[:, :, None] * (_rot(self.angles[:, 1]) * self.signs[:, None, :]))

    def probabilities(self) -> np.ndarray:
        """n map probabilities ∝ |det A| (= σ1·σ2), floored so no map is never used."""
        det = self.sv[:, 0] * self.sv[:, 1]
        p = np.maximum(det, 0.02 * det.max() + 1e-9)
        return p / p.sum()

    def perturbed(self, rng: np.random.Generator, jitter: float) -> IfsSystem:
        """The same system with every parameter moved by a relative amount ≤ ``jitter``."""
        n = len(self.sv)
        sv = np.clip(self.sv * (1 + rng.uniform(-jitter, jitter, (n, 2))), 0.0, 0.98)
        sv = np.sort(sv, axis=1)[:, ::-1]
        angles = self.angles + rng.uniform(-jitter, jitter, (n, 2)) * np.pi / 2
        shift = self.shift + rng.uniform(-jitter, jitter, (n, 2))
        return IfsSystem(sv, angles, self.signs, shift)


def _rot(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def sample_singular_values(rng: np.random.Generator, n: int, total: float) -> np.ndarray:
    """n×2 singular values with σ1 ≥ σ2, all in [0, 1], and Σ(σ1 + 2σ2) = ``total``.

    Drawn map by map, each within the range that leaves the remaining maps a
    feasible share (each map contributes between 0 and 3).
    """
    out = np.zeros((n, 2))
    left = total
    for i in range(n):
        after = 3.0 * (n - i - 1)  # the most the later maps can still take
        s1 = rng.uniform(max(0.0, (left - after) / 3.0), min(1.0, left))
        if i == n - 1:
            s2 = (left - s1) / 2.0
        else:
            s2 = rng.uniform(max(0.0, (left - s1 - after) / 2.0), min(s1, (left - s1) / 2.0))
        out[i] = s1, min(s2, s1)
        left -= s1 + 2.0 * s2
    return np.minimum(out, 0.98)  # strictly contractive: the fixed points exist


def sample_system(rng: np.random.Generator, cfg: FractalConfig) -> IfsSystem:
    """A random IFS: the map count, then each map's σ-factor-constrained parameters."""
    n = int(rng.integers(cfg.min_maps, cfg.max_maps + 1))
    total = rng.uniform((5 + n) / 2, (6 + n) / 2)
    sv = sample_singular_values(rng, n, total)
    angles = rng.uniform(-np.pi, np.pi, (n, 2))
    signs = rng.choice([-1.0, 1.0], (n, 2))
    shift = rng.uniform(-1.0, 1.0, (n, 2))
    return IfsSystem(sv, angles, signs, shift)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Placement:
    """How one instance is drawn on the canvas: extent (share of the side), rotation
    (radians), mirror, centre offset (share of the side), and colours in [0, 1]."""

    scale: float
    rotation: float
    mirror: bool
    offset: tuple[float, float]
    hue: float
    background: tuple[float, float, float]


CANONICAL = Placement(1.0, 0.0, False, (0.0, 0.0), 0.0, (0.0, 0.0, 0.0))


def sample_placement(rng: np.random.Generator, cfg: FractalConfig) -> Placement:
    scale = rng.uniform(cfg.min_scale, cfg.max_scale)
    slack = max(0.0, 1.0 - scale) / 2
    return Placement(
        scale=scale,
        rotation=np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation)),
        mirror=bool(rng.random() < 0.5),
        offset=(rng.uniform(-slack, slack), rng.uniform(-slack, slack)),
        hue=rng.random(),
        background=tuple(rng.uniform(0.0, 0.25, 3)),
    )


def chaos_game(systems: list[IfsSystem], rngs: list[np.random.Generator], points: int) -> tuple[np.ndarray, ...]:
    """Run the chaos game for a batch of systems at once.

    Args:
        systems: M systems (any map counts ≤ 8).
        rngs: one generator per system (its map choices).
        points: points wanted per system (rounded up to whole chains).
    Returns:
        (M×P x, M×P y, M×P map index) float32/float32/int8 point clouds.
    """
    m, n = len(systems), max(len(s.sv) for s in systems)
    chains = -(-points // _KEPT_STEPS)
    mats, shifts, cum = np.zeros((m, n, 2, 2)), np.zeros((m, n, 2)), np.ones((m, n))  # padded maps: never drawn
    start = np.zeros((m, 2))
    for i, s in enumerate(systems):
        k = len(s.sv)
        a = s.matrices()
        mats[i, :k], shifts[i, :k], cum[i, : k - 1] = a, s.shift, np.cumsum(s.probabilities())[:-1]
        j = int(np.argmin(s.sv[:, 0]))  # the most contractive map: its fixed point is well conditioned
        start[i] = np.linalg.solve(np.eye(2) - a[j], s.shift[j])
    steps = _BURN_IN + _KEPT_STEPS
    draws = np.stack([r.random((steps, chains), dtype=np.float32) for r in rngs], axis=1)  # steps×M×C
    picks = (draws[..., None] > cum[None, :, None, :].astype(np.float32)).sum(-1)  # steps×M×C map index
    picks = np.minimum(picks, n - 1) + (np.arange(m) * n)[None, :, None]
    a, b, c, d = (mats[..., i, j].ravel().astype(np.float32) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    e, f = (shifts[..., i].ravel().astype(np.float32) for i in (0, 1))
    x = np.repeat(start[:, :1], chains, axis=1).astype(np.float32)
    y = np.repeat(start[:, 1:], chains, axis=1).astype(np.float32)
    xs, ys = [], []
    for t in range(steps):
        j = picks[t]
        x, y = a[j] * x + b[j] * y + e[j], c[j] * x + d[j] * y + f[j]
        if t >= _BURN_IN:
            xs.append(x), ys.append(y)
    ks = (picks[_BURN_IN:] - (np.arange(m) * n)[None, :, None]).astype(np.int8)
    return np.concatenate(xs, 1), np.concatenate(ys, 1), np.concatenate(list(ks), 1)


def rasterise(
    x: np.ndarray, y: np.ndarray, k: np.ndarray, maps: list[int], placements: list[Placement], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw M point clouds onto M canvases; ``k`` and ``maps`` (each system's map count)
    pick each point's colour.

    Each cloud is centred on its bounding box, scaled so its larger side spans
    ``scale·size``, rotated, mirrored and offset; points off the canvas are dropped.

    Returns:
        (M×S×S×3 uint8 RGB images, M×S×S int32 point counts).
    """
    m, s = x.shape[0], size
    lo_x, hi_x, lo_y, hi_y = x.min(1), x.max(1), y.min(1), y.max(1)
    extent = np.maximum(np.maximum(hi_x - lo_x, hi_y - lo_y), 1e-9)
    px = (x - ((lo_x + hi_x) / 2)[:, None]) / extent[:, None]
    py = (y - ((lo_y + hi_y) / 2)[:, None]) / extent[:, None]
    scale = np.array([p.scale for p in placements])[:, None] * (s - 1)
    rot = np.array([p.rotation for p in placements])[:, None]
    px = np.where(np.array([p.mirror for p in placements])[:, None], -px, px)
    cx = s / 2 + np.array([p.offset[0] for p in placements])[:, None] * s
    cy = s / 2 + np.array([p.offset[1] for p in placements])[:, None] * s
    u = np.floor(cx + scale * (np.cos(rot) * px - np.sin(rot) * py)).astype(np.int64)
    v = np.floor(cy + scale * (np.sin(rot) * px + np.cos(rot) * py)).astype(np.int64)
    inside = (u >= 0) & (u < s) & (v >= 0) & (v < s)
    flat = (np.arange(m)[:, None] * s * s + v * s + u)[inside]
    n = int(max(maps))
    per_map = np.bincount(flat * n + k[inside], minlength=m * s * s * n).reshape(m, s * s, n)
    counts = per_map.sum(-1).reshape(m, s, s)
    # a pixel's colour: the mean colour of the maps whose points fell in it
    mean_colour = (per_map @ _palettes(placements, maps, n)).reshape(m, s, s, 3) / np.maximum(counts, 1)[..., None]
    # Log density, normalised per image at its 95th percentile, so sparse and dense
    # attractors both reach full brightness.
    logc = np.log1p(counts)
    ref = np.array([np.percentile(lc[lc > 0], 95) if (lc > 0).any() else 1.0 for lc in logc])
    alpha = np.clip(logc / ref[:, None, None], 0.0, 1.0)[..., None]
    bg = np.array([p.background for p in placements])[:, None, None, :]
    img = bg * (1 - alpha) + mean_colour * alpha
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), counts.astype(np.int32)


def _palettes(placements: list[Placement], maps: list[int], n: int) -> np.ndarray:
    """M×n×3 map colours in [0, 1]: each system's maps get hues evenly spread from its instance's hue."""
    hue = (np.array([p.hue for p in placements])[:, None] + np.arange(n)[None] / np.array(maps)[:, None]) % 1.0
    return _hsv_to_rgb(hue, 0.8, 1.0)


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """Hues (any shape, in [0, 1)) at saturation ``s`` and value ``v`` → (*h.shape, 3) RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def fill_rate(counts: np.ndarray) -> np.ndarray:
    """Share of each canvas covered by at least one point (M×S×S counts → M floats)."""
    return (counts > 0).mean(axis=(1, 2))


def render(systems: list[IfsSystem], rngs: list[np.random.Generator], placements: list[Placement], size: int,
           points_per_pixel: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Render M systems, each with its own RNG and placement (see `rasterise`)."""
    x, y, k = chaos_game(systems, rngs, int(points_per_pixel * size * size))
    return rasterise(x, y, k, [len(s.sv) for s in systems], placements, size)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Corpus:
    """A rendered corpus. Images are N×S×S×3 uint8 RGB, labels N int64 in [0, K)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def class_systems(cfg: FractalConfig) -> list[IfsSystem]:
    """The K class systems: candidates drawn in order, kept if they pass the filling-rate
    filter. Candidate j depends on (seed, j) only, so a corpus with more classes
    starts with the same classes as one with fewer."""
    kept: list[IfsSystem] = []
    j = 0
    while len(kept) < cfg.classes:
        if j > 50 * cfg.classes + 1000:
            raise ConfigError(
                f"corpus.min_fill: only {len(kept)} of {cfg.classes} classes pass min_fill={cfg.min_fill} "
                f"after {j} candidates; lower min_fill"
            )
        rngs = [np.random.default_rng([cfg.seed, 0, j + i]) for i in range(_CANDIDATES)]
        cands = [sample_system(r, cfg) for r in rngs]
        _, counts = render(cands, rngs, [CANONICAL] * len(cands), cfg.size, cfg.points_per_pixel)
        kept += [c for c, f in zip(cands, fill_rate(counts), strict=True) if f >= cfg.min_fill]
        j += _CANDIDATES
    return kept[: cfg.classes]


def render_instances(cfg: FractalConfig, systems: list[IfsSystem], label_index: list[tuple[int, int]]) -> np.ndarray:
    """Render the (class, instance) pairs in ``label_index``; N×S×S×3 uint8."""
    out = np.empty((len(label_index), cfg.size, cfg.size, 3), np.uint8)
    for lo in range(0, len(label_index), _CHUNK):
        chunk = label_index[lo : lo + _CHUNK]
        place_rngs = [np.random.default_rng([cfg.seed, 1, k, i, 0]) for k, i in chunk]
        inst = [systems[k].perturbed(r, cfg.jitter) for (k, _), r in zip(chunk, place_rngs, strict=True)]
        places = [sample_placement(r, cfg) for r in place_rngs]
        chain_rngs = [np.random.default_rng([cfg.seed, 1, k, i, 1]) for k, i in chunk]
        out[lo : lo + len(chunk)], _ = render(inst, chain_rngs, places, cfg.size, cfg.points_per_pixel)
    return out


def build_corpus(cfg: FractalConfig) -> Corpus:
    """Render the whole corpus: instances ``0..instances-1`` of every class for training,
    the next ``val_instances`` for the held-out split."""
    systems = class_systems(cfg)
    train = [(k, i) for k in range(cfg.classes) for i in range(cfg.instances)]
    val = [(k, cfg.instances + i) for k in range(cfg.classes) for i in range(cfg.val_instances)]
    return Corpus(
        render_instances(cfg, systems, train),
        np.array([k for k, _ in train], np.int64),
        render_instances(cfg, systems, val),
        np.array([k for k, _ in val], np.int64),
    )


def corpus_key(cfg: FractalConfig) -> dict:
    """What determines the corpus (the cache key's content)."""
    return {"corpus": asdict(cfg), "generator_version": GENERATOR_VERSION}


def ensure_corpus(cfg: FractalConfig, folder: Path) -> Path:
    """The corpus file in ``folder``, rendered unless a file of the same config exists.

    The write is atomic, so concurrent callers never read half a file.

    Raises:
        DataError: ``folder`` holds a corpus of another config.
    """
    folder = Path(folder)
    path, meta = folder / CORPUS_FILE, folder / "corpus.json"
    want = json.loads(json.dumps(corpus_key(cfg)))
    if path.is_file() and meta.is_file():
        if json.loads(meta.read_text()) != want:
            raise DataError(f"{folder}: holds a fractal corpus of another config; expected {want}")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(cfg)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **{name: getattr(corpus, name) for name in Corpus.__dataclass_fields__})
    meta.write_text(json.dumps(want, indent=1))
    return path


def cached_corpus(cfg: FractalConfig, cache: Path) -> Path:
    """The corpus file of ``cfg`` under ``cache/fractals/<hash of its config>/``, rendered if missing."""
    from training.config import config_digest

    return ensure_corpus(cfg, Path(cache) / "fractals" / config_digest(corpus_key(cfg)))


def load_corpus(path: Path) -> Corpus:
    """Read a corpus written by `ensure_corpus`."""
    try:
        with np.load(path) as data:
            return Corpus(**{name: data[name] for name in Corpus.__dataclass_fields__})
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: not a readable fractal corpus ({err})") from None


def preview(corpus: Corpus, *, classes: int = 8, per_class: int = 8) -> np.ndarray:
    """A grid of training images, one row per class: (classes·S)×(per_class·S)×3 uint8."""
    rows = []
    for k in range(min(classes, int(corpus.train_labels.max()) + 1)):
        imgs = corpus.train_images[corpus.train_labels == k][:per_class]
        rows.append(np.concatenate(list(imgs), axis=1))
    return np.concatenate(rows, axis=0)
