"""Refinement fan-out benchmark: a plain loop vs Ray CPU actors, and our CRF vs a bare pydensecrf call.

Makes one fake trial (synthetic test images, CAMs = blurred ground truth + seeded
noise) in a temporary folder, then in this one process:

1. refines every shard with ``refine_reference`` (plain single-process loop);
2. refines the same units with ``refine_units`` on ``--actors`` CPU actors
   (``ray.init`` timed separately; a second ratio includes it) and checks both
   give identical counts;
3. times ``postproc.crf.crf_refine`` against a bare pydensecrf call with the same
   settings, alternating over the same images, and prints the overhead.

Usage::

    .venv/bin/python benchmarks/refine_fanout.py            # 24 images of 512², 4 shards, CRF 5 iterations
    .venv/bin/python benchmarks/refine_fanout.py --images 8 --size 128   # a quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from training.trial_dir import TrialDir


def make_trial(folder: Path, *, size: int, images: int, shards: int, seed: int = 0) -> Path:
    """A trial folder with ``config.yaml`` and CAM shards over a synthetic test split."""
    from training.config import DataConfig, TrialConfig, save_config
    from training.data import read_mask, scan_test
    from training.shards import write_shards
    from training.synth import SynthConfig, generate

    synth = SynthConfig(size=size, n_train=2, n_test=images, smoke_fraction=0.5, seed=seed)
    data = generate(synth, folder / "data")
    trial = TrialDir(folder / "trial")
    trial.path.mkdir()
    save_config(TrialConfig(name="bench", data=DataConfig(root=str(data), synth=synth, image_size=size)),
                trial.config)
    rng = np.random.default_rng(seed)
    items = scan_test(data)
    cams = []
    for item in items:
        gt = read_mask(item.mask, shape=(size, size)).astype(np.float32)
        cam = cv2.GaussianBlur(gt, (0, 0), size / 32) + rng.normal(0, 0.15, gt.shape)
        cams.append(np.clip(cam, 0, 1).astype(np.float32))
    labels = np.ones(len(items), np.int64)
    write_shards(trial.cams, [i.id for i in items], cams, labels.astype(np.float32), labels,
                 shard_size=-(-len(items) // shards))
    return trial.path


def time_fanout(units: list, actors: int) -> dict[str, float]:
    """Seconds of the plain loop, of ``ray.init`` and of the fan-out over the same units."""
    import ray

    from orchestrator.refine import refine_reference, refine_units

    start = time.perf_counter()
    reference = refine_reference(units)
    loop = time.perf_counter() - start
    shutil.rmtree(TrialDir(units[0].trial_dir).refine)
    start = time.perf_counter()
    ray.init(address="local", num_cpus=actors, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False)  # fmt: skip
    init = time.perf_counter() - start
    try:
        start = time.perf_counter()
        fanned = refine_units(units, cpu_actors=actors, progress=False)
        fan = time.perf_counter() - start
    finally:
        ray.shutdown()
    if [r.counter for r in fanned] != [r.counter for r in reference]:
        raise SystemExit("fan-out and plain loop disagree: counts differ")
    return {"loop": loop, "init": init, "fan": fan, "busy": sum(r.seconds for r in fanned)}


def bare_crf(image: np.ndarray, cam: np.ndarray, *, iters: int, scale: float = 12.0) -> np.ndarray:
    """pydensecrf called directly with crf_refine's default settings (alpha 1, clip 1e-5)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = cam.shape
    probs = np.clip(np.stack([1.0 - cam, cam]), 1e-5, 1.0)
    probs /= probs.sum(axis=0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    crf.addPairwiseGaussian(sxy=3.0 / scale, compat=3.0)
    crf.addPairwiseBilateral(sxy=80.0 / scale, srgb=13.0, rgbim=image, compat=10.0)
    return np.asarray(crf.inference(iters)).reshape(2, h, w).argmax(axis=0) == 1


def time_crf(trial: Path, *, iters: int, rounds: int, n_images: int) -> dict[str, float]:
    """Median per-image seconds of crf_refine and of the bare call, alternated image by image."""
    from orchestrator.refine import data_root
    from postproc.crf import crf_refine
    from training.data import read_image, scan_test
    from training.shards import read_all

    shard = read_all(TrialDir(trial).cams)
    images = {i.id: read_image(i.image) for i in scan_test(data_root(trial))}
    ours, bare = [], []
    for n in range(rounds):
        for image_id, cam in list(zip(shard.ids, shard.cams, strict=True))[:n_images]:
            image = np.ascontiguousarray(images[image_id])
            calls = [(ours, crf_refine), (bare, bare_crf)]
            masks = []
            for times, function in calls if n % 2 == 0 else calls[::-1]:  # alternate who goes first
                start = time.perf_counter()
                masks.append(function(image, cam, iters=iters))
                times.append(time.perf_counter() - start)
            if not np.array_equal(*masks):
                raise SystemExit(f"{image_id}: crf_refine and the bare call disagree")
    return {"ours": statistics.median(ours), "bare": statistics.median(bare)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--images", type=int, default=24, help="test images (CAMs)")
    parser.add_argument("--shards", type=int, default=4, help="CAM shards (work units)")
    parser.add_argument("--iters", type=int, default=5, help="CRF mean-field iterations")
    parser.add_argument("--actors", type=int, default=2, help="Ray CPU actors")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the images for the CRF timing")
    parser.add_argument("--crf-images", type=int, default=12, help="images in the CRF timing")
    args = parser.parse_args(argv)
    from orchestrator.refine import make_units

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="refine-bench-") as tmp:
        trial = make_trial(Path(tmp), size=args.size, images=args.images, shards=args.shards)
        units = make_units({"bench": trial}, [[{"step": "crf", "iters": args.iters}]], include_seed=False)
        import training.data  # noqa: F401  (torch) imported before timing, as in a sweep's driver

        fan = time_fanout(units, args.actors)
        crf = time_crf(trial, iters=args.iters, rounds=args.rounds, n_images=args.crf_images)
    n = args.images
    print(f"{n} images {args.size}², {len(units)} shards, CRF {args.iters} iterations, {args.actors} actors, "
          f"{os.cpu_count()} cores, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| measure | seconds | images/s | ratio to loop |\n|---|---|---|---|")
    print(f"| plain loop (refine_reference) | {fan['loop']:.2f} | {n / fan['loop']:.2f} | 1.00 |")
    print(f"| Ray fan-out, after ray.init | {fan['fan']:.2f} | {n / fan['fan']:.2f} | {fan['loop'] / fan['fan']:.2f} |")
    total, init = fan["init"] + fan["fan"], fan["init"]
    print(f"| Ray fan-out incl. ray.init ({init:.2f} s) | {total:.2f} | {n / total:.2f} | {fan['loop'] / total:.2f} |")
    overhead = crf["ours"] / crf["bare"] - 1
    print(f"actors busy {fan['busy']:.2f} s in all (units' own time): start-up and dispatch ≈ "
          f"{fan['fan'] - fan['busy'] / args.actors:.2f} s of the fan-out")
    timed = min(n, args.crf_images)
    print(f"\nCRF per image (median of {args.rounds}×{timed}): crf_refine {crf['ours'] * 1000:.0f} ms, "
          f"bare pydensecrf {crf['bare'] * 1000:.0f} ms, overhead {overhead:+.1%}")
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
