"""One trial, without Ray: train, checkpoint, extract CAMs, score, write results.

`run_trial` is the single code path behind both ``wsss trial`` and every Ray
Tune trial: the orchestrator only adds a per-epoch callback (to report and
checkpoint) and a resume directory, so a sweep's trial can be rerun locally
with its resolved config and give the same metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from training.atomic import atomic_path
from training.config import DataConfig, TrialConfig, config_digest, save_config
from training.data import EvalDataset, TrainDataset, scan_test, scan_train
from training.errors import DataError
from training.evaluate import EvalSet, extract_cams, quick_eval, save_gallery, score
from training.feature_cache import IndexedDataset, TeacherFeatures, cache_enabled, ensure_teacher_features
from training.loop import (
    configure_threads,
    default_num_workers,
    epoch_loader,
    load_state,
    make_optimizer,
    pick_device,
    save_state,
    seed_everything,
    train_epoch,
)
from training.paradigms import Paradigm, build_paradigm, save_net_checkpoint
from training.pretrain import pretrain_identity, resolve_pretrained
from training.shards import write_shards
from training.synth import generate
from training.tracker import ConsoleTracker, Tracker
from training.trial_dir import TrialDir
from training.validation import Validation, load_validation, quick_validation, score_validation, split_validation

EpochCallback = Callable[[dict[str, float], Path], None]


def cache_root() -> Path:
    """Where synthetic datasets and trained teachers are cached (``$WSSS_CACHE``)."""
    return Path(os.environ.get("WSSS_CACHE") or Path.home() / ".cache" / "wsss-sweeps").resolve()


def prepare_data(cfg: DataConfig, cache: Path | None = None) -> Path:
    """The dataset folder for ``cfg``: a real folder, or a generated synthetic one
    (deterministic for its config, so every node and rerun gets the same data)."""
    if cfg.source == "folder":
        root = Path(cfg.root).expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"data.root: {root} is not a folder; expected train/ and test/ inside")
        return root
    key = config_digest({"data.synth": dataclasses.asdict(cfg.synth)})
    root = Path(cfg.root).expanduser().resolve() if cfg.root else (cache or cache_root()) / "synth" / key
    return generate(cfg.synth, root)


def load_splits(cfg: DataConfig, root: Path) -> tuple[TrainDataset, EvalSet]:
    """The training images (less the validation split, `training.validation`) and the test split."""
    items, _ = split_validation(scan_train(root), cfg.val_fraction)
    train = TrainDataset(items, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std, augment=cfg.augment)
    items = scan_test(root)
    test = EvalDataset(items, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std)
    evalset = EvalSet.load(test, subsets_of_test_images(root, [item.id for item in items]))
    if not any(gt.any() for gt in evalset.gts):  # before training, not when the final metrics find out
        raise DataError(
            f"{Path(root) / 'test' / 'masks'}: none of the {len(evalset.gts)} test masks has a smoke pixel, so "
            "smoke IoU is undefined; expected at least one test image with smoke (mask pixels 255, or 1)",
            kind="no_smoke_in_test",
        )
    return train, evalset


def subsets_of_test_images(root: Path, ids: list[str]) -> list[str] | None:
    """Each test image's subset from the synthetic ``manifest.json``; None for real data
    (no manifest) or when the manifest does not list every image."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    listed = {entry["id"]: entry.get("subset") for entry in json.loads(path.read_text()).get("test", [])}
    subsets = [listed.get(i) for i in ids]
    return subsets if all(subsets) else None


# ---------------------------------------------------------------- the teacher


def teacher_config(cfg: TrialConfig) -> TrialConfig:
    """The baseline-CNN trial that produces the frozen teacher of ``cfg``."""
    return cfg.replace(
        **{
            "name": "teacher",
            "transfer.paradigm": "baseline",
            "transfer.baseline_network": "teacher",
            "transfer.teacher_checkpoint": "",
            "train.epochs": cfg.train.teacher_epochs,
            "train.lr": cfg.train.teacher_lr,
        }
    )


def teacher_key(cfg: TrialConfig) -> str:
    """Hash of what determines the teacher's weights (not device or thread count)."""
    t = teacher_config(cfg)
    neutral = {"train.device": "auto", "train.threads": 0, "train.teacher_cache": "float16"}
    d = t.replace(**neutral).to_dict()
    # a pre-training reference counts by its file's content, so editing the file retrains the teacher
    d["model"]["teacher"]["pretrained"] = pretrain_identity(t.model.teacher.pretrained)
    return config_digest({"data": d["data"], "model.teacher": d["model"]["teacher"], "train": d["train"]})


def teacher_run_dir(cfg: TrialConfig, cache: Path | None = None) -> Path:
    """The folder the teacher of ``cfg`` trains in; its checkpoint is ``<folder>.pt`` beside it."""
    return (cache or cache_root()) / "teachers" / f"teacher-{teacher_key(cfg)}"


def ensure_teacher(cfg: TrialConfig, cache: Path | None = None, *, tracker: Tracker | None = None) -> Path:
    """Train the teacher of ``cfg`` unless a cached one exists; returns its checkpoint.

    Cached by `teacher_key`, so reruns and other sweeps with the same teacher
    config reuse it. The write is atomic: concurrent callers never read half a file.
    """
    run_dir = teacher_run_dir(cfg, cache)
    path = run_dir.parent / f"{run_dir.name}.pt"
    if path.is_file():
        return path
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tcfg = teacher_config(cfg)
    run_trial(tcfg, run_dir, tracker=tracker or ConsoleTracker(run_dir), cache=cache)
    model = _rebuild_from_state(tcfg, run_dir)
    with atomic_path(path) as tmp:
        save_net_checkpoint(model.cam_net, tmp, meta={"config": json.dumps(tcfg.to_dict())})
    return path


def _rebuild_from_state(cfg: TrialConfig, run_dir: Path) -> Paradigm:
    # The saved state replaces every weight: build from scratch, never load pretrained ones first.
    model = build_paradigm(cfg.replace(**{"model.teacher.pretrained": "false", "model.student.pretrained": "false"}))
    state = torch.load(TrialDir(run_dir).state, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model


# ---------------------------------------------------------------- the trial


def run_trial(
    cfg: TrialConfig,
    out_dir: Path,
    *,
    tracker: Tracker | None = None,
    on_epoch: EpochCallback | None = None,
    resume_from: Path | None = None,
    cache: Path | None = None,
    teacher_checkpoint: str | None = None,
) -> dict[str, float]:
    """Train and evaluate one trial; write ``config.yaml``, ``metrics.json``,
    ``checkpoint/``, ``cams/`` and ``gallery/`` into ``out_dir``.

    Args:
        cfg: the resolved trial config.
        out_dir: output folder (created).
        tracker: where params/metrics/artifacts go (default: console + events.jsonl).
        on_epoch: called after each epoch with its metrics and checkpoint folder.
        resume_from: a checkpoint folder written by an earlier run of this trial.
        cache: cache folder for synthetic data, teachers and pre-trained backbones (default `cache_root()`).
        teacher_checkpoint: overrides ``cfg.transfer.teacher_checkpoint``.
    Returns:
        The final metrics (also in ``metrics.json``).
    """
    out = TrialDir(Path(out_dir).resolve()).create()
    tracker = tracker or ConsoleTracker(out.path)
    save_config(cfg, out.config)
    tracker.log_params(cfg.to_dict())
    configure_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    root = prepare_data(cfg.data, cache)
    train_ds, evalset = load_splits(cfg.data, root)
    val = load_validation(cfg.data, root)
    if cfg.transfer.paradigm_info.frozen_teacher:
        teacher_checkpoint = str(teacher_checkpoint or cfg.transfer.teacher_checkpoint or ensure_teacher(cfg, cache))
    built = resolve_pretrained(cfg, cache or cache_root())  # `pretrain:` references → backbones (trained if missing)
    seed_everything(cfg.train.seed)  # same initial weights whether or not a teacher was just trained
    model = build_paradigm(built, teacher_checkpoint).to(device)
    if cfg.train.channels_last:
        model.use_channels_last()
    features = teacher_features(cfg, model, train_ds, teacher_checkpoint, cache, device)
    train_set = IndexedDataset(train_ds) if features is not None else train_ds
    workers = default_num_workers(device, cfg.data.num_workers)
    loader_opts = {"num_workers": workers, "pin": device.type == "cuda"}
    first = epoch_loader(train_set, cfg.train, 0, **loader_opts)
    opt, sched = make_optimizer(model, cfg.train, len(first))
    done = load_state(resume_from, model, opt, sched) if resume_from else 0
    for epoch in range(done, cfg.train.epochs):
        loader = epoch_loader(train_set, cfg.train, epoch, **loader_opts)
        metrics = train_epoch(model, loader, opt, sched, cfg.train, device, epoch=epoch, teacher_features=features)
        metrics |= quick_eval(model.cam_net, evalset, cfg.cam, device, num_workers=workers)
        if val is not None:
            metrics |= quick_validation(model.cam_net, val, cfg.cam, device)
        metrics["epoch"] = epoch + 1
        ckpt = save_state(out.checkpoint, model, opt, sched, epoch + 1)
        tracker.log_metrics(metrics, step=epoch + 1)
        if on_epoch is not None:
            on_epoch(metrics, ckpt)
    return finish_trial(model, cfg, evalset, out, device, tracker, val=val)


def teacher_features(
    cfg: TrialConfig, model: Paradigm, train_ds: TrainDataset, checkpoint: str | None, cache: Path | None, device
) -> TeacherFeatures | None:
    """The frozen teacher's cached feature maps, or None where the teacher must run
    in every step (other paradigms, augmented inputs, ``train.teacher_cache=false``)."""
    if not cache_enabled(cfg.train.teacher_cache, cfg.data.augment, cfg.transfer.paradigm):
        return None
    return ensure_teacher_features(
        model.teacher,
        train_ds,
        teacher_checkpoint=str(checkpoint),
        cache=cache or cache_root(),
        dtype=cfg.train.teacher_cache,
        device=device,
        batch_size=cfg.cam.batch_size,
    )


def finish_trial(
    model: Paradigm,
    cfg: TrialConfig,
    evalset: EvalSet,
    out: TrialDir,
    device,
    tracker: Tracker,
    *,
    val: Validation | None = None,
) -> dict[str, float]:
    """Extract CAMs, write shards and gallery, score, and record the metrics.

    With a validation split, its metrics (``val_*``) join the test metrics and its
    CAMs go to ``val_cams/`` beside ``cams/``, so settings can be re-scored on it.
    """
    workers = default_num_workers(device, cfg.data.num_workers)
    camset = extract_cams(model.cam_net, evalset, cfg.cam, device, num_workers=workers)
    write_shards(out.cams, camset.ids, camset.cams, camset.logits, camset.labels, shard_size=cfg.cam.shard_size)
    metrics = score(camset, evalset, cfg.cam.threshold)
    if val is not None:
        val_metrics, val_cams = score_validation(model.cam_net, val, cfg.cam, device, num_workers=workers)
        metrics |= val_metrics
        if val_cams is not None:
            c = val_cams
            write_shards(out.val_cams, c.ids, c.cams, c.logits, c.labels, shard_size=cfg.cam.shard_size)
    out.write_metrics(metrics)
    tracker.log_metrics(metrics, step=cfg.train.epochs)
    for path in save_gallery(camset, evalset, out.gallery, cfg.cam.gallery):
        tracker.log_artifact(path, out.gallery.name)  # the run mirrors the folder: gallery/
    tracker.log_artifact(out.config, None)
    tracker.log_artifact(out.metrics, None)
    return metrics
