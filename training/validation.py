"""A validation split carved from the training images, for choosing settings without the test set.

``data.val_fraction`` holds out, per class, that share of ``train/smoke`` and
``train/clean``: the images whose file stems have the smallest SHA-256 digests.
Membership therefore depends only on the file names — not on their order or the
training seed — so every trial, node and rerun holds out the same images.

Held-out images with a mask in ``train/masks/<stem>.png`` (and optionally a chimney
mask in ``train/context/<stem>.png``) are scored like the test split (CAM mIoU,
context activation…); every held-out image counts for ``val_accuracy``. The
synthetic generator writes both masks for every training image; real data
without them gets validation accuracy only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.config import CamConfig, DataConfig
from training.data import MASK_SUFFIX, EvalDataset, EvalItem, TrainDataset, scan_train
from training.errors import ConfigError, DataError
from training.evaluate import EvalSet, extract_cams, quick_eval, score
from training.metrics import accuracy
from training.models import Backbone
from training.shards import CamShard

TrainItems = list[tuple[Path, int]]


def _rank(path: Path) -> str:
    return hashlib.sha256(Path(path).stem.encode()).hexdigest()


def split_validation(items: Sequence[tuple[Path, int]], fraction: float) -> tuple[TrainItems, TrainItems]:
    """Split (path, label) training items into (train, validation), stratified by label.

    Each class of n images gives ``round(n · fraction)`` images to validation, at least
    one and at most n − 1, so both sides keep every class. ``fraction`` 0 keeps
    everything for training.

    Args:
        items: (path, label) pairs, e.g. from `training.data.scan_train`.
        fraction: share of each class held out, in [0, 1).

    Returns:
        (training items, validation items), each in the input order.

    Raises:
        ConfigError: ``fraction`` outside [0, 1), or a class with fewer than 2
            images when ``fraction`` > 0.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a value in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(items), []
    held: set[Path] = set()
    for label in sorted({label for _, label in items}):
        paths = [p for p, lab in items if lab == label]
        if len(paths) < 2:
            raise ConfigError(
                f"data.val_fraction={fraction}: class {label} has {len(paths)} training image(s); "
                "expected at least 2 to hold one out for validation"
            )
        k = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
        held.update(sorted(paths, key=_rank)[:k])
    return [it for it in items if it[0] not in held], [it for it in items if it[0] in held]


def validation_items(root: Path, items: Sequence[tuple[Path, int]]) -> tuple[list[EvalItem], TrainItems]:
    """Sort held-out images into those with a smoke mask (scored) and the others.

    Args:
        root: the dataset folder (masks are looked up in ``train/masks`` and ``train/context``).
        items: held-out (path, label) pairs from `split_validation`.

    Returns:
        (EvalItems with mask, context and folder label, (path, label) pairs without a mask).
    """
    train = Path(root) / "train"
    stems: dict[str, Path] = {}
    for path, _ in items:
        if path.stem in stems:
            raise DataError(
                f"{stems[path.stem]} and {path} share the file stem {path.stem!r}; expected unique stems "
                "across train/smoke and train/clean (train/masks are matched by stem)"
            )
        stems[path.stem] = path
    scored, unscored = [], []
    for path, label in items:
        mask = train / "masks" / f"{path.stem}{MASK_SUFFIX}"
        context = train / "context" / f"{path.stem}{MASK_SUFFIX}"
        if mask.is_file():
            scored.append(EvalItem(path.stem, path, mask, context if context.is_file() else None, label))
        else:
            unscored.append((path, label))
    return scored, unscored


@dataclass
class Validation:
    """The held-out training images, as the trial evaluates them.

    Attributes:
        scored: images with a smoke mask (CAM metrics and accuracy), or None.
        unscored: images without one (accuracy only), or None.
    """

    scored: EvalSet | None
    unscored: TrainDataset | None

    def __len__(self) -> int:
        scored = len(self.scored.dataset) if self.scored is not None else 0
        return scored + (len(self.unscored) if self.unscored is not None else 0)


def load_validation(cfg: DataConfig, root: Path) -> Validation | None:
    """The validation split of ``cfg`` (``data.val_fraction``), or None when it is 0."""
    if cfg.val_fraction == 0.0:
        return None
    _, held = split_validation(scan_train(root), cfg.val_fraction)
    scored, unscored = validation_items(root, held)
    norm = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
    return Validation(
        EvalSet.load(EvalDataset(scored, **norm)) if scored else None,
        TrainDataset(unscored, **norm) if unscored else None,
    )


@torch.no_grad()
def predict_logits(net: Backbone, dataset: TrainDataset, device: torch.device, *, batch_size: int) -> np.ndarray:
    """N smoke logits of a labelled dataset's images (eval mode, one forward per batch)."""
    net.eval()
    out = [net(x.to(device))[0][:, 0].float().cpu() for x, _ in DataLoader(dataset, batch_size=batch_size)]
    return torch.cat(out).numpy()


def _pooled_accuracy(parts: list[tuple[float, int]]) -> float:
    """Accuracy over the union of parts given as (accuracy, image count)."""
    correct = sum(round(acc * n) for acc, n in parts)
    return correct / sum(n for _, n in parts)


def _unscored_part(net: Backbone, val: Validation, device, batch_size: int) -> list[tuple[float, int]]:
    if val.unscored is None:
        return []
    logits = predict_logits(net, val.unscored, device, batch_size=batch_size)
    return [(accuracy(logits, val.unscored.labels), len(val.unscored))]


def quick_validation(net: Backbone, val: Validation, cam: CamConfig, device: torch.device) -> dict[str, float]:
    """Per-epoch numbers on the validation split: ``val_accuracy`` (every held-out image)
    and, where masks exist, ``val_miou_1x`` (single-scale CAMs, the trial's CAM config)."""
    batch_size = cam.batch_size
    out, parts = {}, []
    if val.scored is not None:
        quick = quick_eval(net, val.scored, cam, device)
        if _has_smoke(val.scored):
            out["val_miou_1x"] = quick["test_miou_1x"]
        parts.append((quick["test_accuracy"], len(val.scored.dataset)))
    out["val_accuracy"] = _pooled_accuracy(parts + _unscored_part(net, val, device, batch_size))
    return out


def score_validation(
    net: Backbone, val: Validation, cfg: CamConfig, device: torch.device, *, num_workers: int = 0
) -> tuple[dict[str, float], CamShard | None]:
    """Final validation metrics, named ``val_<metric>``, and the validation CAMs.

    With masks: every metric of `training.evaluate.score` (``val_miou``,
    ``val_miou_per_image``, ``val_oracle_miou``, ``val_context_activation``…) over the
    scored images; ``val_accuracy`` always counts every held-out image.

    Returns:
        (metrics, the scored images' CamShard or None).
    """
    metrics: dict[str, float] = {}
    camset, parts = None, []
    if val.scored is not None:
        camset = extract_cams(net, val.scored, cfg, device, num_workers=num_workers)
        if _has_smoke(val.scored):
            metrics = score(camset, val.scored, cfg.threshold)
        parts.append((accuracy(camset.logits, camset.labels), len(camset.ids)))
    metrics["accuracy"] = _pooled_accuracy(parts + _unscored_part(net, val, device, cfg.batch_size))
    return {f"val_{k}": v for k, v in sorted(metrics.items())}, camset


def _has_smoke(evalset: EvalSet | None) -> bool:
    """CAM metrics need at least one scored image with smoke in its mask."""
    return evalset is not None and any(gt.any() for gt in evalset.gts)
