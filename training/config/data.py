"""The data section of a trial config: the synthetic benchmark's parameters and the input pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config.parse import at_least, one_of
from training.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic benchmark (all sizes relative to ``size``).

    Attributes:
        size: side of the square images, px.
        n_train: training images (smoke and clean together).
        n_test: test images (coupled and decoupled subsets together).
        smoke_fraction: share of smoke images in train and in the coupled test subset.
        chimney_in_clean: probability that a clean train/coupled-test image shows a chimney.
        chimney_with_smoke: probability that a smoke *training* image shows its chimney
            (1.0: always, the built-in flaw). A plume without one is drawn like the
            decoupled test smoke (rising from below the frame or entering from a side).
        decoupled_fraction: share of the test split that is the decoupled subset.
        min_opacity: lowest peak opacity of a plume.
        max_opacity: highest peak opacity of a plume.
        distractor_prob: probability of grey clouds and/or haze, in both classes.
        plume_scale: multiplies plume width and length; the difficulty knob.
        seed: makes the whole dataset reproducible.
    """

    size: int = 96
    n_train: int = 1200
    n_test: int = 240
    smoke_fraction: float = 0.6
    chimney_in_clean: float = 0.1
    chimney_with_smoke: float = 1.0
    decoupled_fraction: float = 0.25
    min_opacity: float = 0.35
    max_opacity: float = 0.9
    distractor_prob: float = 0.5
    plume_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self, "size", lo=32, hi=4096, integer=True)
        _check(self, "n_train", lo=2, hi=10**7, integer=True)
        _check(self, "n_test", lo=1, hi=10**7, integer=True)
        _check(self, "seed", lo=0, hi=2**63 - 1, integer=True)
        shares = ("smoke_fraction", "chimney_in_clean", "chimney_with_smoke", "decoupled_fraction", "distractor_prob")
        for name in shares:
            _check(self, name, lo=0.0, hi=1.0)
        _check(self, "min_opacity", lo=0.05, hi=1.0)
        _check(self, "max_opacity", lo=self.min_opacity, hi=1.0)
        _check(self, "plume_scale", lo=0.2, hi=3.0)
        n_smoke = round(self.n_train * self.smoke_fraction)
        if not 0 < n_smoke < self.n_train:
            raise ConfigError(
                f"synth.smoke_fraction: expected a value leaving at least one smoke and one clean "
                f"image among n_train={self.n_train}, got {self.smoke_fraction}"
            )


def _check(cfg: SynthConfig, name: str, *, lo: float, hi: float, integer: bool = False) -> None:
    value = getattr(cfg, name)
    types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"synth.{name}: expected {what} in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are fed to the networks."""

    source: str = "synthetic"  # "synthetic" (generated, cached) or "folder"
    root: str = ""  # folder with train/ and test/; for synthetic: the cache folder
    synth: SynthConfig = field(default_factory=SynthConfig)
    image_size: int = 96  # training/eval input side, px (the thesis: 512)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: bool = False  # horizontal flips; disables the teacher feature cache
    num_workers: int = 0
    val_fraction: float = 0.0  # share of each training class held out to choose settings on (training.validation)

    def check(self, path: str) -> None:
        one_of(self.source, ("synthetic", "folder"), f"{path}.source")
        if self.source == "folder" and not self.root:
            raise ConfigError(f"{path}.root: expected a dataset folder when source is 'folder'")
        at_least(self.image_size, 16, f"{path}.image_size")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{path}.{name}: expected 3 values (R, G, B)")
        if min(self.std) <= 0:
            raise ConfigError(f"{path}.std: expected positive values, got {list(self.std)}")
        at_least(self.num_workers, 0, f"{path}.num_workers")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{path}.val_fraction: expected a value in [0, 1), got {self.val_fraction}")
