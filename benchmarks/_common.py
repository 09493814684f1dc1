"""Shared pieces of the benchmarks: model presets, in-memory data, and interleaved timing.

Timings alternate between the variants round by round (the order rotating), and each
figure is the median over rounds, so a burst of load from another process hits every
variant alike instead of one of them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

# Models of the shipped configs: `thesis` = trials/thesis.yaml; `cpu` = trials/cpu.yaml as the figures in
# docs/performance.md were measured (a 4-block ViT; cpu.yaml now has 2 blocks, about half the cost).
PRESETS = {
    "cpu": {
        "image_size": 64,
        "batch_size": 32,
        "teacher": {"name": "resnet18", "output_stride": 8, "options": {"channels": [16, 32, 64, 128]}},
        "student": {
            "name": "vit_tiny_patch16_224",
            "options": {"patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3},
        },
    },
    "thesis": {
        "image_size": 512,
        "batch_size": 8,
        "teacher": {"name": "resnet50", "output_stride": 16},
        "student": {"name": "vit_base_patch16_224"},
    },
}


def trial_config(preset: str, *, image_size: int | None = None, batch_size: int | None = None, **overrides):
    """A TrialConfig with the preset's models (random weights, nothing downloaded)."""
    from training.config import TrialConfig, from_dict

    p = PRESETS[preset]
    cfg = from_dict(
        TrialConfig,
        {
            "data": {"image_size": image_size or p["image_size"]},
            "model": {"teacher": p["teacher"], "student": p["student"]},
            "train": {"batch_size": batch_size or p["batch_size"], "device": "auto", "lr": 1e-4},
        },
    )
    return cfg.replace(**overrides) if overrides else cfg


class TensorImages(torch.utils.data.Dataset):
    """N random normalised images with labels, as `training.data.TrainDataset` returns them."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.labels = (torch.rand(n, generator=gen) < 0.6).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each variant per round; the order rotates every round."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    """One line naming the machine and its load, printed with every figure."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )
