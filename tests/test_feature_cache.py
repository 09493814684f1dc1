"""The teacher feature cache: cached and uncached teacher paths give the same transfer loss,
the cache is built once per (teacher, data, size, dtype), and it is off where it must be."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import TrialConfig
from training.data import TrainDataset, scan_train
from training.feature_cache import IndexedDataset, cache_enabled, cache_path, ensure_teacher_features
from training.models import build_net
from training.paradigms import build_paradigm, save_net_checkpoint
from training.tracker import RecordingTracker
from training.trial import run_trial

# float16 keeps 11 significant bits: each cached element is within 2⁻¹¹ ≈ 4.9e-4 of its fp32
# value, relatively. The transfer losses are smooth in the (linearly projected) features with
# relative sensitivity O(1), so the loss moves relatively by at most about one such unit; the
# rounding errors of many elements mostly cancel, and on this data the largest relative change
# seen was 2.1e-5 (cosine/spatial). The tolerance is the one-unit bound, 20× the worst seen; a
# mix-up (another image's features) moves every loss by ≥ 3e-3 relatively, 6× the tolerance.
FP16_REL = 2.0**-11
# float32 reproduces the uncached values (bit-equal here); allow for convolutions whose
# summation order depends on the batch size (the cache is built in batches of another size).
FP32_REL = 1e-6

PAIRS = [("cosine", "global"), ("l1", "global"), ("l2", "global"), ("cosine", "spatial"), ("cosine", "gram")]
PAIRS += [("kl", "logits")]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, make_config: Callable[..., TrialConfig]) -> Path:
    """A random-weight tiny teacher checkpoint (what the cache is keyed on)."""
    cfg = make_config()
    torch.manual_seed(0)
    net = build_net(cfg.model.teacher, image_size=cfg.data.image_size)
    with torch.no_grad():  # BatchNorm running stats away from (0, 1), so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_net_checkpoint(net, path, meta={})
    return path


@pytest.fixture(scope="module")
def train_ds(make_config: Callable[..., TrialConfig], synth_root: Path) -> TrainDataset:
    cfg = make_config()
    return TrainDataset(scan_train(synth_root), image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std)


def _student_teacher(make_config, ckpt: Path, metric: str, level: str):
    cfg = make_config(**{"transfer.paradigm": "teacher_student", "transfer.metric": metric, "transfer.level": level})
    torch.manual_seed(1)
    return build_paradigm(cfg, str(ckpt))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("metric", "level"), PAIRS)
def test_cached_and_uncached_transfer_loss_agree(
    make_config, teacher_ckpt: Path, train_ds: TrainDataset, tmp_path: Path, metric: str, level: str, dtype: str
) -> None:
    model = _student_teacher(make_config, teacher_ckpt, metric, level)
    model.train()  # the teacher must stay in eval mode all the same
    feats = ensure_teacher_features(model.teacher, train_ds, teacher_checkpoint=str(teacher_ckpt), cache=tmp_path,
                                    dtype=dtype, batch_size=7)  # fmt: skip
    idx = torch.tensor([5, 0, 31, 17, 17, 2])  # unsorted, repeated: as a shuffled loader might ask
    images = torch.stack([train_ds[i][0] for i in idx])
    labels = torch.stack([train_ds[i][1] for i in idx])
    fmap = feats(idx)
    assert fmap.dtype == getattr(torch, dtype) and fmap.shape[0] == len(idx)
    with torch.no_grad():
        _, uncached = model.loss(images, labels)
        _, cached = model.loss(images, labels, fmap)
        _, wrong = model.loss(images, labels, feats(idx.roll(1)))
    tol = (FP32_REL if dtype == "float32" else FP16_REL) * abs(uncached["loss_transfer"])
    assert abs(cached["loss_transfer"] - uncached["loss_transfer"]) <= tol
    assert cached["loss_cls"] == uncached["loss_cls"]  # the student side is untouched
    # guards the tolerance: features of the wrong images are caught by it with room to spare
    assert abs(wrong["loss_transfer"] - uncached["loss_transfer"]) > 4 * FP16_REL * abs(uncached["loss_transfer"])


def test_cache_built_once_and_keyed(teacher_ckpt: Path, train_ds: TrainDataset, make_config, tmp_path: Path) -> None:
    model = _student_teacher(make_config, teacher_ckpt, "cosine", "global")
    first = ensure_teacher_features(model.teacher, train_ds, teacher_checkpoint=str(teacher_ckpt), cache=tmp_path)
    path = cache_path(tmp_path, str(teacher_ckpt), train_ds, "float16")
    assert path.is_file() and path.parent.name == "teacher-features"
    assert len(first) == len(train_ds) and first.shape == (64, 4, 4)  # ResNet-10-T tiny, 32 px, stride 8
    stamp = path.stat().st_mtime_ns
    again = ensure_teacher_features(model.teacher, train_ds, teacher_checkpoint=str(teacher_ckpt), cache=tmp_path)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(first.array, again.array)
    assert not list(path.parent.glob(".*tmp*"))  # nothing half-written left behind
    exact = cache_path(tmp_path, str(teacher_ckpt), train_ds, "float32")
    assert exact != path
    other = train_ds.__class__(train_ds.items, image_size=48, mean=train_ds.mean, std=train_ds.std)
    assert cache_path(tmp_path, str(teacher_ckpt), other, "float16").name != path.name


def test_indexed_dataset_appends_the_index(train_ds: TrainDataset) -> None:
    wrapped = IndexedDataset(train_ds)
    assert len(wrapped) == len(train_ds)
    image, label, index = wrapped[3]
    assert index == 3 and torch.equal(image, train_ds[3][0]) and torch.equal(label, train_ds[3][1])


@pytest.mark.parametrize(
    ("mode", "augment", "paradigm", "expected"),
    [
        ("float16", False, "teacher_student", True),
        ("float32", False, "teacher_student", True),
        ("false", False, "teacher_student", False),
        ("float16", True, "teacher_student", False),  # a flipped image has other teacher features
        ("float16", False, "co_training", False),  # the teacher learns
        ("float16", False, "baseline", False),
    ],
)
def test_cache_enabled(mode: str, augment: bool, paradigm: str, expected: bool) -> None:
    assert cache_enabled(mode, augment, paradigm) is expected


def test_trial_with_cache_matches_uncached(make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSSS_CACHE", str(tmp_path / "cache"))
    base = make_config(**{"transfer.paradigm": "teacher_student", "cam.gallery": 0, "train.epochs": 1})
    runs = {}
    for mode in ("false", "float32"):
        tracker = RecordingTracker()
        run_trial(base.replace(**{"train.teacher_cache": mode}), tmp_path / mode, tracker=tracker)
        runs[mode] = tracker.metrics[0][1]
    files = list((tmp_path / "cache" / "teacher-features").glob("*.npy"))
    assert [p.name.endswith("-float32.npy") for p in files] == [True]
    for key in ("loss", "loss_cls", "loss_transfer"):
        assert runs["float32"][key] == pytest.approx(runs["false"][key], rel=1e-4, abs=1e-6), key

    # augmented training never reads the cache (nor writes a new one)
    run_trial(base.replace(**{"data.augment": True}), tmp_path / "aug", tracker=RecordingTracker())
    assert list((tmp_path / "cache" / "teacher-features").glob("*.npy")) == files
