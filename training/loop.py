"""The optimisation loop shared by trials and teacher training.

Determinism: the data order of epoch ``e`` depends only on ``(seed, e)``, and
checkpoints hold the model, optimiser, schedule and epoch, so a trial resumed
from epoch ``e`` ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.atomic import atomic_path
from training.config import TrainConfig
from training.errors import CheckpointError, ConfigError, TrainingDiverged
from training.paradigms import Paradigm
from training.trial_dir import STATE_FILE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, *, field: str = "train.device") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named.

    Raises:
        ConfigError: naming ``field``, when the CUDA device asked for is not visible here.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    fix = f"set {field}=auto (a GPU when there is one, else the CPU) or {field}=cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} requested but no CUDA device is visible here; {fix}")
    index = name.partition(":")[2] or "0"
    count = torch.cuda.device_count()
    if not index.isdigit() or int(index) >= count:
        visible = f"cuda:0…cuda:{count - 1}" if count > 1 else "cuda:0"
        raise ConfigError(f"{field}: {name!r} requested but the visible CUDA devices are {visible}; {fix}")
    return torch.device(name)


def configure_threads(threads: int) -> None:
    """Pin torch's intra-op threads (one per trial when trials share a CPU box)."""
    if threads > 0:
        torch.set_num_threads(threads)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(model: Paradigm, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW with linear warm-up then cosine decay, stepped per batch."""
    opt = torch.optim.AdamW(model.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_loader(dataset: Dataset, cfg: TrainConfig, epoch: int, *, num_workers: int = 0, pin: bool = False):
    """A shuffled loader whose order is a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=gen,
        drop_last=len(dataset) > cfg.batch_size,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
    )


def train_epoch(
    model: Paradigm,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    sched,
    cfg: TrainConfig,
    device: torch.device,
    *,
    epoch: int,
    teacher_features=None,
) -> dict[str, float]:
    """One pass over the training set; returns every loss term averaged.

    Args:
        teacher_features: optional callable ``indices → B×C×h×w`` reading the
            frozen teacher's cached feature maps (teacher_student only).

    Raises:
        TrainingDiverged: a loss became NaN or infinite (names epoch and step).
    """
    # Augmentation flips (and any dropout) draw from the global generators: reseed them per
    # epoch so a run resumed at epoch e draws what an uninterrupted run would.
    seed_everything(cfg.seed * 1000 + epoch)
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for step, batch in enumerate(loader):
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        # cached features are pinned on CUDA, so this copy overlaps the student's forward
        t_fmap = teacher_features(batch[2]).to(device, non_blocking=True) if teacher_features is not None else None
        with autocast(cfg, device):
            loss, terms = model.loss(images, labels, t_fmap)
        if not math.isfinite(terms["loss"]):
            bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
            raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {step + 1}: {bad}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def save_state(path: Path, model: Paradigm, opt, sched, epoch: int) -> Path:
    """Atomically write everything needed to resume after ``epoch`` (1-based count done)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch}
    with atomic_path(path / STATE_FILE) as tmp:
        torch.save(state, tmp)
    return path


def load_state(path: Path, model: Paradigm, opt, sched) -> int:
    """Restore a `save_state` checkpoint; returns the number of epochs already done."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: no trial checkpoint here")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"{file}: not a usable trial checkpoint ({err})") from None
    return int(state["epoch"])


def default_num_workers(device: torch.device, requested: int) -> int:
    """DataLoader workers: the requested count, but none on a 2-core CPU box."""
    if requested > 0:
        return requested
    return min(8, (os.cpu_count() or 1) // 2) if device.type == "cuda" else 0
