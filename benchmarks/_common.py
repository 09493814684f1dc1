"""Shared pieces of the benchmarks: model presets, in-memory data, interleaved timing, and
timed training steps with their peak memory (`timed_steps`).

Timings alternate between the variants round by round (the order rotating), and each
figure is the median over rounds, so a burst of load from another process hits every
variant alike instead of one of them.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Models of the shipped configs: `thesis` = trials/thesis.yaml; `cpu` = trials/cpu.yaml as the figures in
# docs/performance.md were measured (a 4-block ViT; cpu.yaml now has 2 blocks, about half the cost);
# `bench` = trials/bench.yaml, the CPU benchmark preset (the 2-block ViT, EfficientNet-Lite0 cut after 4
# stages; random weights here: only the cost is measured).
PRESETS = {
    "bench": {
        "image_size": 64,
        "batch_size": 32,
        "teacher": {"name": "tf_efficientnet_lite0", "output_stride": 8, "stages": 4},
        "student": {
            "name": "vit_tiny_patch16_224",
            "options": {"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3},
        },
    },
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


def build_model(cfg, teacher_ckpt: str | Path | None, device: torch.device):
    """The trial's paradigm with seeded random weights, on ``device``, channels-last if ``cfg`` asks."""
    from training.paradigms import build_paradigm

    torch.manual_seed(cfg.train.seed)
    model = build_paradigm(cfg, str(teacher_ckpt) if teacher_ckpt else None).to(device)
    return model.use_channels_last() if cfg.train.channels_last else model


def random_teacher_checkpoint(cfg, folder: Path) -> Path:
    """A checkpoint of ``cfg``'s teacher with random weights (nothing downloaded), for timing only."""
    from training.models import build_net
    from training.paradigms import save_net_checkpoint

    path = Path(folder) / "teacher.pt"
    save_net_checkpoint(build_net(cfg.model.teacher, image_size=cfg.data.image_size), path, meta={})
    return path


class PeakMemory:
    """Peak memory since `reset`.

    On CUDA: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``). On a CPU: the
    process's resident-set high-water mark (Linux ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``). That also counts the interpreter and its libraries, so it is a
    stand-in that lets a CPU dry run take the same path, not a figure to compare with a GPU's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux: the high-water mark then counts from the start of the process

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
        except (OSError, AttributeError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reserved_bytes(self) -> int | None:
        """The caching allocator's reserved peak (CUDA), None on a CPU."""
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what earlier variants left, so the next peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class StepRun:
    """Timed training steps of one variant."""

    seconds: list[float]  # wall time of each timed step
    start: float  # time.monotonic() when timing began (one clock for every process of a Linux machine)
    end: float  # time.monotonic() when the last timed step ended
    peak_bytes: int  # PeakMemory over the model's build, warm-up and timed steps
    reserved_bytes: int | None  # CUDA only: the caching allocator's peak

    @property
    def median_s(self) -> float:
        return median(self.seconds)


def timed_steps(
    cfg,
    teacher_ckpt: str | Path | None,
    device: torch.device,
    *,
    cached: bool,
    warmup: int,
    steps: int,
    min_seconds: float = 0.0,
    before_timing: Callable[[], None] | None = None,
) -> StepRun:
    """Training steps of ``cfg``'s paradigm on one fixed batch of random images.

    Each step is `training.loop.train_epoch` over a one-batch loader: the trial's own step
    (forward under the configured autocast, backward, AdamW, schedule). After ``warmup`` steps
    (AdamW state, allocator, cuDNN's kernel choice) it calls ``before_timing`` (a barrier for
    processes started together), then times at least ``steps`` steps and ``min_seconds``.

    Args:
        cached: read the teacher's feature map from a feature-cache file built first
            (``train.teacher_cache`` dtype) instead of running the teacher in the step.
    """
    from training.feature_cache import TeacherFeatures, compute_features
    from training.loop import make_optimizer, train_epoch

    release(device)
    meter = PeakMemory(device)
    meter.reset()
    model = build_model(cfg, teacher_ckpt, device)
    bs = cfg.train.batch_size
    data = TensorImages(bs, cfg.data.image_size)
    # the images live on the device (a step, not the loader, is timed); indices stay on the CPU,
    # where the cache reads them, as a DataLoader gives them
    batch = (data.images.to(device), data.labels.to(device), torch.arange(bs))
    opt, sched = make_optimizer(model, cfg.train, warmup + steps)
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        feats = None
        if cached:  # as a trial reads it: a memory-mapped .npy, pinned copies on CUDA
            path = Path(tmp) / "features.npy"
            dtype = cfg.train.teacher_cache if cfg.train.teacher_cache != "false" else "float16"
            compute_features(model.teacher, data, path, dtype=dtype, device=device, batch_size=bs)
            feats = TeacherFeatures(np.load(path, mmap_mode="r"), pin=device.type == "cuda")

        def step() -> None:
            train_epoch(model, [batch], opt, sched, cfg.train, device, epoch=0, teacher_features=feats)
            sync(device)

        for _ in range(warmup):
            step()
        if before_timing is not None:
            before_timing()
        times: list[float] = []
        start = time.monotonic()
        while len(times) < steps or time.monotonic() - start < min_seconds:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        end = time.monotonic()
        return StepRun(times, start, end, meter.peak_bytes(), meter.reserved_bytes())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], None]], rounds: int, device: torch.device, *, clock=time.perf_counter
) -> dict[str, list[float]]:
    """Seconds of each variant per round; the order rotates every round.

    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time,
    which on a CPU box shared with other jobs varies less than the wall clock (on a GPU it
    would miss the device's work).
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = clock()
            variants[name]()
            sync(device)
            times[name].append(clock() - start)
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
