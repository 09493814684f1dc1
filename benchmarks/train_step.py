"""Training step benchmark: ViT-only baseline vs teacher-student (uncached and cached) vs SCD.

In one process, with the same student initialisation and the same batches:

1. ``baseline``: the ViT student alone (BCE), the reference;
2. ``teacher_student`` without the cache: the frozen CNN teacher runs in every step;
3. ``teacher_student`` with the cache: the teacher's feature maps are read from a
   float16 ``.npy`` memmap built once (its build time is printed, not counted per step);
4. ``self_correspondence`` with the SCD settings of ``--scd-space`` (its SCD trials' ``scd``
   section: ``search_spaces/scd_cpu.yaml``'s CPU-sized settings by default), every term
   on (no warm-up), and ``scd_with_teacher`` with the cache;
5. with ``--scd-paper``: ``self_correspondence`` with the paper's settings (``SCDConfig()``).

Each variant runs ``loop.train_epoch`` over ``--steps`` batches (DataLoader, forward,
backward, AdamW step), rounds interleaved. Prints seconds per step, images/s and the
ratio to the baseline (goals: the cached teacher-student step ≤ 1.15×, the SCD step ≤ 2×),
and checks that the cached and uncached paths give the same transfer loss on one batch.

Usage::

    .venv/bin/python benchmarks/train_step.py                               # cpu.yaml models, 64 px, batch 32
    .venv/bin/python benchmarks/train_step.py --preset bench --threads 1    # the SCD goal (bench.yaml models)
    .venv/bin/python benchmarks/train_step.py --preset thesis --image-size 128 --batch-size 4
    .venv/bin/python benchmarks/train_step.py --preset thesis --precision bf16 --channels-last   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import (
    PRESETS,
    TensorImages,
    build_model,
    interleaved,
    machine,
    median,
    random_teacher_checkpoint,
    sync,
    trial_config,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="cache storage")
    ap.add_argument("--scd-space", type=Path, default=SCD_SPACE, help="sweep file whose SCD settings to time")
    ap.add_argument("--scd-paper", action="store_true", help="also time SCD at the paper's settings (~10×)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared CPU box; CPU only)")
    args = ap.parse_args()

    from training.feature_cache import IndexedDataset, TeacherFeatures, compute_features
    from training.loop import default_num_workers, epoch_loader, make_optimizer, pick_device, train_epoch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = trial_config(args.preset, image_size=args.image_size, batch_size=args.batch_size)
    cfg = cfg.replace(**{"train.precision": args.precision, "train.channels_last": args.channels_last})
    device = pick_device("auto")
    size, bs = cfg.data.image_size, cfg.train.batch_size
    data = TensorImages(bs * args.steps, size)
    tmp = Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    ckpt = random_teacher_checkpoint(cfg, tmp)

    base = build_model(cfg.replace(**{"transfer.paradigm": "baseline"}), None, device)
    uncached = build_model(cfg, str(ckpt), device)
    cached = build_model(cfg, str(ckpt), device)
    start = time.perf_counter()
    store = tmp / "features.npy"
    compute_features(cached.teacher, data, store, dtype=args.dtype, device=device, batch_size=bs)
    build_s = time.perf_counter() - start
    features = TeacherFeatures(np.load(store, mmap_mode="r"), pin=device.type == "cuda")

    workers = default_num_workers(device, 0)
    opts = {"num_workers": workers, "pin": device.type == "cuda"}

    def runner(model, dataset, feats=None):
        opt, sched = make_optimizer(model, cfg.train, args.steps)

        def run() -> None:
            loader = epoch_loader(dataset, cfg.train, 0, **opts)
            train_epoch(model, loader, opt, sched, cfg.train, device, epoch=0, teacher_features=feats)

        return run

    scd = dataclasses.replace(scd_settings(args.scd_space), warmup_fraction=0.0)  # every term in every step
    scd_name = f"SCD, {args.scd_space.name} settings"
    variants = {
        "baseline (ViT only)": runner(base, data),
        "teacher-student, uncached": runner(uncached, data),
        f"teacher-student, cached ({args.dtype})": runner(cached, IndexedDataset(data), features),
        scd_name: runner(build_model(scd_config(cfg, "self_correspondence", scd), None, device), data),
        "SCD + teacher, cached": runner(build_model(scd_config(cfg, "scd_with_teacher", scd), str(ckpt), device),
                                        IndexedDataset(data), features),
    }
    if args.scd_paper:
        paper = scd_config(cfg, "self_correspondence", None).replace(**{"scd.warmup_fraction": 0.0})
        variants["SCD, the paper's settings"] = runner(build_model(paper, None, device), data)
    for run in variants.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        run()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved(variants, args.rounds, device, clock=clock)

    # the same batch through both teacher paths (fresh models, no training in between)
    a, b = build_model(cfg, str(ckpt), device), build_model(cfg, str(ckpt), device)
    idx = torch.arange(bs)
    images, labels = data.images[:bs].to(device), data.labels[:bs].to(device)
    with torch.no_grad():
        _, t_uncached = a.loss(images, labels)
        _, t_cached = b.loss(images, labels, features(idx).to(device))
    sync(device)

    print(f"machine: {machine()}")
    print(
        f"preset {args.preset}: student {cfg.model.student.name}, teacher {cfg.model.teacher.name}, "
        f"{size}×{size}, batch {bs}, {args.steps} steps × {args.rounds} rounds, {cfg.train.precision}, "
        f"channels_last={cfg.train.channels_last}, device {device}, DataLoader workers {workers}, "
        f"{args.clock} clock"
    )
    print(f"feature cache: built in {build_s:.2f} s for {len(data)} images, "
          f"{features.array.nbytes / len(data) / 1024:.1f} KiB per image ({args.dtype}, shape {features.shape})")
    ref = median(times["baseline (ViT only)"]) / args.steps
    print(f"SCD settings timed ({args.scd_space}): {scd}")
    print(f"{'variant':<36} {'s/step':>9} {'images/s':>9} {'ratio':>7}")
    for name, ts in times.items():
        per = median(ts) / args.steps
        print(f"{name:<36} {per:9.4f} {bs / per:9.1f} {per / ref:7.3f}")
    diff = abs(t_cached["loss_transfer"] - t_uncached["loss_transfer"])
    print(f"transfer loss on one batch: uncached {t_uncached['loss_transfer']:.7f}, "
          f"cached {t_cached['loss_transfer']:.7f}, |diff| {diff:.2e} "
          f"(relative {diff / max(abs(t_uncached['loss_transfer']), 1e-12):.2e})")
    goal = median(times[list(times)[2]]) / args.steps / ref
    print(f"goal: cached step ≤ 1.15 × baseline step: {'met' if goal <= 1.15 else 'NOT met'} ({goal:.3f})")
    goal = median(times[scd_name]) / args.steps / ref
    print(f"goal (issue 15): SCD step ≤ 2 × baseline step: {'met' if goal <= 2 else 'NOT met'} ({goal:.3f})")


SCD_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "scd_cpu.yaml"


def scd_settings(space: Path):
    """The ``scd`` section of the first SCD trial of a sweep file (what its SCD arms train with)."""
    from orchestrator.space import expand, load_space

    trials = [t for t in expand(load_space(space)) if t.config.transfer.paradigm_info.scd]
    if not trials:
        raise SystemExit(f"{space}: no trial of an SCD paradigm (self_correspondence, scd_with_teacher)")
    return trials[0].config.scd


def scd_config(cfg, paradigm: str, scd):
    """``cfg`` (the preset's models and batch) as an SCD trial with ``scd`` (None: the paper's defaults)."""
    return cfg.replace(**{"transfer.paradigm": paradigm, "scd": None if scd is None else dataclasses.asdict(scd)})


if __name__ == "__main__":
    main()
