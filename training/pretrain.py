"""Pre-training a backbone on the fractal corpus: a student prior without ImageNet.

A pretrain config (YAML, shipped ones in ``search_spaces/pretrain/``) names the
corpus, the network and the schedule. `ensure_pretrained` trains the network by
K-way classification of the corpus's classes, with a temporary K-class head, and
saves the backbone without that head. The checkpoint is cached by a hash of
everything that determines its weights (`pretrain_key`: corpus, network,
normalisation, schedule; not the device, the thread count or the file's name),
so reruns and sweeps reuse it.

A trial asks for it by config: ``model.student.pretrained: "pretrain:fractal_vit"``
(a shipped name) or ``"pretrain:path/to/file.yaml"``. `resolve_pretrained` turns
that into the cached checkpoint's path, training it first on a machine that has
none, and the backbone then loads through `training.models.load_weights`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.atomic import atomic_path, atomic_write_json
from training.config import TrainConfig, TrialConfig, config_digest
from training.config.pretrain import (
    PRETRAIN_PREFIX,
    PretrainConfig,
    PretrainSchedule,
    check_pretrain_ref,
    is_pretrain_ref,
    load_pretrain_config,
)
from training.data import to_tensor
from training.errors import ConfigError
from training.fractals import cached_corpus, corpus_key, load_corpus
from training.loop import (
    configure_threads,
    epoch_loader,
    load_state,
    make_optimizer,
    pick_device,
    save_state,
    seed_everything,
    train_epoch,
)
from training.models import Backbone, build_net, save_backbone_checkpoint
from training.paradigms import Paradigm
from training.tracker import ConsoleTracker, Tracker
from training.trial_dir import TrialDir

PRETRAIN_VERSION = 1  # bump when the pre-training recipe changes, so cached backbones are rebuilt


def loop_settings(schedule: PretrainSchedule, *, device: str, threads: int) -> TrainConfig:
    """The shared loop's settings (`training.loop`) for a pre-training schedule."""
    return TrainConfig(
        epochs=schedule.epochs, batch_size=schedule.batch_size, lr=schedule.lr, weight_decay=schedule.weight_decay,
        warmup_epochs=schedule.warmup_epochs, seed=schedule.seed, device=device, threads=threads,
    )  # fmt: skip


def pretrain_key(cfg: PretrainConfig) -> str:
    """Hash of what determines the pre-trained weights (not name, device or threads)."""
    net = {"name": cfg.net.name, "output_stride": cfg.net.output_stride, "options": cfg.net.options}
    return config_digest({
        "corpus": corpus_key(cfg.corpus), "net": net, "mean": list(cfg.mean), "std": list(cfg.std),
        "train": dataclasses.asdict(cfg.train), "version": PRETRAIN_VERSION,
    })  # fmt: skip


def pretrain_identity(value: str) -> str:
    """A ``pretrained`` value for cache keys: a pretrain reference becomes the hash of its
    config's content, so editing the file changes the keys that depend on it."""
    if not is_pretrain_ref(value):
        return value
    return f"pretrain@{pretrain_key(load_pretrain_config(value.removeprefix(PRETRAIN_PREFIX)))}"


# ---------------------------------------------------------------- training


class Pretraining(Paradigm):
    """K-way classification of the corpus with label-smoothed cross-entropy."""

    def __init__(self, net: Backbone, *, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.cam_net = net
        self.label_smoothing = label_smoothing

    def loss(self, images, labels, teacher_fmap=None):
        logits, _ = self.cam_net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        hits = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss": loss.item(), "train_accuracy": hits.item()}


class CorpusDataset(torch.utils.data.Dataset):
    """Corpus images as normalised 3×S×S float32 tensors, with int64 class labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, mean, std) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.images[index], self.mean, self.std), torch.tensor(int(self.labels[index]))


@torch.no_grad()
def accuracy(net: Backbone, dataset: CorpusDataset, device: torch.device, *, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``net`` on ``dataset``; NaN when it is empty."""
    if len(dataset) == 0:
        return float("nan")
    net.eval()
    hits = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        hits += int((net(images.to(device))[0].argmax(1).cpu() == labels).sum())
    return hits / len(dataset)


def run_pretraining(
    cfg: PretrainConfig, run_dir: Path, cache: Path, *, device: str, threads: int, tracker: Tracker,
    device_field: str = "device",
) -> tuple[Pretraining, dict[str, float]]:  # fmt: skip
    """Train ``cfg.net`` on the corpus; resumes from ``run_dir/checkpoint`` if a run stopped.

    ``device_field`` names where ``device`` came from, for the error when it is not visible.

    Returns:
        (the trained model, the last epoch's metrics: loss, train_accuracy, val_accuracy, epoch).
    """
    configure_threads(threads)
    dev = pick_device(device, field=device_field)
    corpus = load_corpus(cached_corpus(cfg.corpus, cache))
    train_set = CorpusDataset(corpus.train_images, corpus.train_labels, mean=cfg.mean, std=cfg.std)
    val_set = CorpusDataset(corpus.val_images, corpus.val_labels, mean=cfg.mean, std=cfg.std)
    seed_everything(cfg.train.seed)
    net = build_net(cfg.net, image_size=cfg.corpus.size, num_classes=cfg.corpus.classes)
    model = Pretraining(net, label_smoothing=cfg.train.label_smoothing).to(dev)
    loop = loop_settings(cfg.train, device=device, threads=threads)
    opt, sched = make_optimizer(model, loop, len(epoch_loader(train_set, loop, 0)))
    run = TrialDir(run_dir)
    done = load_state(run.checkpoint, model, opt, sched) if run.state.is_file() else 0
    metrics: dict[str, float] = {}
    for epoch in range(done, loop.epochs):
        metrics = train_epoch(model, epoch_loader(train_set, loop, epoch), opt, sched, loop, dev, epoch=epoch)
        metrics |= {"val_accuracy": accuracy(model.cam_net, val_set, dev), "epoch": epoch + 1}
        save_state(run.checkpoint, model, opt, sched, epoch + 1)
        tracker.log_metrics(metrics, step=epoch + 1)
    if not metrics:  # every epoch was done before: only the held-out score is recomputed
        metrics = {"val_accuracy": accuracy(model.cam_net, val_set, dev), "epoch": loop.epochs}
    return model, metrics


def pretrained_path(cfg: PretrainConfig, cache: Path) -> Path:
    """Where the backbone of ``cfg`` is (or will be) cached."""
    return Path(cache) / "pretrain" / f"pretrain-{pretrain_key(cfg)}.pt"


def ensure_pretrained(
    cfg: PretrainConfig, cache: Path, *, device: str | None = None, threads: int | None = None,
    tracker: Tracker | None = None,
) -> Path:  # fmt: skip
    """Pre-train ``cfg.net`` unless a cached backbone exists; returns its checkpoint.

    Args:
        cfg: the pretrain config.
        cache: the cache folder (corpora in ``fractals/``, backbones in ``pretrain/``).
        device: overrides ``cfg.device`` (a trial passes its own).
        threads: overrides ``cfg.threads``.
        tracker: per-epoch metrics (default: console + ``events.jsonl`` in the run folder).
    """
    path = pretrained_path(cfg, cache)
    if path.is_file():
        return path
    run_dir = path.with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    field = "device" if device is None else "train.device"  # a trial's device overrides the config's
    device = cfg.device if device is None else device
    threads = cfg.threads if threads is None else threads
    model, metrics = run_pretraining(
        cfg, run_dir, Path(cache), device=device, threads=threads, tracker=tracker or ConsoleTracker(run_dir),
        device_field=field,
    )  # fmt: skip
    TrialDir(run_dir).write_metrics(metrics)
    meta = {"config": json.dumps(cfg.to_dict()), "key": pretrain_key(cfg), "classes": cfg.corpus.classes}
    with atomic_path(path) as tmp:
        save_backbone_checkpoint(model.cam_net.net, tmp, meta=meta | {"val_accuracy": metrics["val_accuracy"]})
    return path


# ---------------------------------------------------------------- inside a trial


def _built_nets(cfg: TrialConfig) -> tuple[str, ...]:
    """The networks a trial builds with their ``pretrained`` weights (teacher_student
    loads its teacher from the teacher's checkpoint instead)."""
    t = cfg.transfer
    if t.paradigm == "baseline":
        return (t.baseline_network,)
    return ("student",) if t.paradigm == "teacher_student" else ("teacher", "student")


def resolve_pretrained(cfg: TrialConfig, cache: Path) -> TrialConfig:
    """``cfg`` with each ``pretrain:`` reference of a network it builds replaced by the
    cached backbone's path, pre-training it first where it is missing.

    Raises:
        ConfigError: a bad reference, or a pretrain config normalising inputs unlike ``data``.
    """
    paths = {}
    for which in _built_nets(cfg):
        net = getattr(cfg.model, which)
        if not is_pretrain_ref(net.pretrained):
            continue
        key = f"model.{which}.pretrained"
        pcfg = check_pretrain_ref(net, key)
        if (tuple(pcfg.mean), tuple(pcfg.std)) != (tuple(cfg.data.mean), tuple(cfg.data.std)):
            raise ConfigError(
                f"{key}: {net.pretrained!r} normalises inputs with mean {list(pcfg.mean)}, std {list(pcfg.std)}, "
                f"but data.mean/data.std are {list(cfg.data.mean)}, {list(cfg.data.std)}; make them equal"
            )
        paths[key] = str(ensure_pretrained(pcfg, cache, device=cfg.train.device, threads=cfg.train.threads))
    return cfg.replace(**paths) if paths else cfg
