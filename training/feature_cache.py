"""The frozen teacher's feature maps, computed once per teacher and read by every trial.

In teacher_student training the teacher is frozen (eval mode, no gradients) and,
without augmentation, sees the same image every epoch, so its last feature map
per training image is a constant. `ensure_teacher_features` computes those maps
once (batched, no grad) and stores them as one ``.npy`` array of N×C×h×w
under ``<cache>/teacher-features/``; trials memory-map it and `TeacherFeatures`
gathers a batch by index, so a teacher-student step costs about what a
ViT-only step costs.

Storage dtype (``train.teacher_cache``):

- ``float16`` (default): half the bytes. Every element is rounded to 11
  significant bits (relative error ≤ 2⁻¹¹ ≈ 4.9e-4), which moves the transfer
  loss by about that relative amount; the ResNet-50 teacher at 512² (2048×32×32
  per image) takes 4 MiB per image, 10 GiB for the thesis's 2,488 images.
- ``float32``: the exact values of the uncached path (up to the last bits that
  the convolution's batch size may change); twice the disk and page cache.
- ``false``: no cache; the teacher runs in every step (always the case with
  ``data.augment``, where a flipped image has other features).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.atomic import atomic_path
from training.config import names
from training.models import Backbone
from training.shards import sha256_file

DTYPES = {"float16": np.float16, "float32": np.float32}


class IndexedDataset(Dataset):
    """Wraps a dataset so items become ``(*item, index)``: `loop.train_epoch` reads
    ``batch[2]`` to fetch the cached teacher features of the batch. The order a
    seeded loader draws is unchanged (same length, same sampler)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


class TeacherFeatures:
    """``indices → B×C×h×w`` float tensor of cached teacher features (on the CPU;
    pinned when ``pin`` so the host-to-GPU copy can overlap).

    Args:
        array: N×C×h×w float16/float32 array, usually a read-only memmap.
        pin: return page-locked tensors (CUDA training).
    """

    def __init__(self, array: np.ndarray, *, pin: bool = False) -> None:
        self.array = array
        self.pin = pin

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are sequential on disk
        rows = np.empty((len(idx), *self.array.shape[1:]), dtype=self.array.dtype)
        rows[order] = self.array[idx[order]]
        out = torch.from_numpy(rows)
        return out.pin_memory() if self.pin else out


def cache_enabled(mode: str, augment: bool, paradigm: str) -> bool:
    """The cache serves only frozen teachers (`ParadigmInfo.teacher_cache`) on fixed (unaugmented) inputs."""
    return names.PARADIGMS.get(paradigm, field="transfer.paradigm").teacher_cache and mode != "false" and not augment


def data_digest(dataset) -> str:
    """What fixes the teacher's inputs: every training file (path, size, mtime), the
    input size and the normalisation. A changed or replaced image gets a new cache."""
    h = hashlib.sha256()
    h.update(repr((dataset.image_size, tuple(dataset.mean.ravel()), tuple(dataset.std.ravel()))).encode())
    for path, label in dataset.items:
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(cache: Path, teacher_checkpoint: str, dataset, dtype: str) -> Path:
    """``<cache>/teacher-features/<teacher sha>-<data digest>-<image size>-<dtype>.npy``."""
    name = f"{sha256_file(Path(teacher_checkpoint))[:16]}-{data_digest(dataset)}-{dataset.image_size}-{dtype}.npy"
    return Path(cache) / "teacher-features" / name


@torch.no_grad()
def compute_features(teacher: Backbone, dataset: Dataset, path: Path, *, dtype: str, device, batch_size: int) -> None:
    """Write the teacher's eval-mode feature maps over ``dataset`` (in dataset order)
    to the ``.npy`` file ``path`` as N×C×h×w ``dtype``, one batch at a time."""
    was_training = teacher.training
    teacher.eval()
    out = None
    start = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        fmap = teacher.feature_map(batch[0].to(device)).float().cpu().numpy()
        if out is None:
            shape = (len(dataset), *fmap.shape[1:])
            out = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPES[dtype], shape=shape)
        out[start : start + len(fmap)] = fmap
        start += len(fmap)
    if out is None:
        raise ValueError("teacher feature cache: the training set is empty")
    out.flush()
    teacher.train(was_training)


@contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: concurrent trials on one node build the file
    once; the others wait and then read it. (Across nodes the atomic rename alone
    keeps readers safe; two nodes may both build it.)"""
    lock = path.with_suffix(path.suffix + ".lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_teacher_features(
    teacher: Backbone,
    dataset: Dataset,
    *,
    teacher_checkpoint: str,
    cache: Path,
    dtype: str = "float16",
    device: torch.device | None = None,
    batch_size: int = 32,
) -> TeacherFeatures:
    """The cached features of ``teacher`` over ``dataset``, computed on first use.

    Args:
        teacher: the frozen teacher, already on ``device`` (its weights come from
            ``teacher_checkpoint``, whose content hash names the cache file).
        dataset: the training set (a `training.data.TrainDataset` without augmentation).
        teacher_checkpoint: the checkpoint file the teacher was loaded from.
        cache: cache root; the file goes to ``<cache>/teacher-features/``.
        dtype: ``float16`` or ``float32`` storage.
    Returns:
        A callable ``indices → B×C×h×w`` reading a read-only memmap.
    """
    device = device or torch.device("cpu")
    path = cache_path(cache, teacher_checkpoint, dataset, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        with _locked(path):
            if not path.is_file():
                with atomic_path(path) as tmp:
                    compute_features(teacher, dataset, tmp, dtype=dtype, device=device, batch_size=batch_size)
    return TeacherFeatures(np.load(path, mmap_mode="r"), pin=device.type == "cuda")
