"""CAM extraction benchmark: per-image loop vs batched, with and without the shared logits forward.

In one process, over the same synthetic test images and the same network (eval, no grad):

1. ``per-image loop`` (the reference): one image at a time, a logits forward, then the
   multi-scale CAM (one forward per scale);
2. ``batched, separate logits``: ``--batch`` images per call, still a separate logits forward
   (what `extract_cams` did before);
3. ``batched, shared`` (`training.evaluate.extract_cams` now): batched, and the logits come
   from the scale-1 CAM's forward pass.

Rounds are interleaved; prints seconds, images/s and the ratio of each to the reference,
and checks that all three give the same CAMs and logits.

Usage::

    .venv/bin/python benchmarks/cam_extraction.py                        # ViT student of cpu.yaml, 64 px, 4 scales
    .venv/bin/python benchmarks/cam_extraction.py --net teacher --images 32
    .venv/bin/python benchmarks/cam_extraction.py --preset thesis --image-size 512 --images 64   # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import PRESETS, interleaved, machine, median, trial_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--net", choices=["student", "teacher"], default="student")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--scales", default="0.5,1.0,1.5,2.0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from training.cams import multiscale_cams
    from training.config import CamConfig
    from training.data import EvalDataset, scan_test
    from training.evaluate import EvalSet, extract_cams
    from training.loop import pick_device
    from training.models import build_net
    from training.synth import SynthConfig, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = trial_config(args.preset, image_size=args.image_size)
    size = cfg.data.image_size
    device = pick_device("auto")
    root = generate(SynthConfig(size=size, n_train=2, n_test=args.images, seed=1), Path(tempfile.mkdtemp()) / "d")
    evalset = EvalSet.load(EvalDataset(scan_test(root), image_size=size, mean=cfg.data.mean, std=cfg.data.std))
    torch.manual_seed(0)
    net = build_net(getattr(cfg.model, args.net), image_size=size).to(device).eval()
    cam_cfg = CamConfig(scales=tuple(float(s) for s in args.scales.split(",")), batch_size=args.batch)
    images = torch.stack([evalset.dataset[i]["image"] for i in range(len(evalset.dataset))]).to(device)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def loop(batch: int, name: str) -> None:
        cams, logits = [], []
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            logits.append(net(x)[0][:, 0].cpu())
            cams.append(multiscale_cams(net, x, cam_cfg).cpu())
        out[name] = (torch.cat(cams).numpy(), torch.cat(logits).numpy())

    def shared() -> None:
        camset = extract_cams(net, evalset, cam_cfg, device)
        out["shared"] = (np.stack(camset.cams), camset.logits)

    variants = {
        "per-image loop (reference)": lambda: loop(1, "per-image"),
        f"batched ({args.batch}), separate logits": lambda: loop(args.batch, "separate"),
        f"batched ({args.batch}), shared forward": shared,
    }
    for run in variants.values():
        run()
    times = interleaved(variants, args.rounds, device)

    print(f"machine: {machine()}")
    print(f"net {getattr(cfg.model, args.net).name} ({args.net} of preset {args.preset}), {size}×{size}, "
          f"{len(images)} images, scales {list(cam_cfg.scales)}, {args.rounds} rounds, device {device}")
    ref = median(times["per-image loop (reference)"])
    print(f"{'variant':<36} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    for name, ts in times.items():
        t = median(ts)
        print(f"{name:<36} {t:8.3f} {len(images) / t:9.1f} {ref / t:8.2f}×")
    for name in ("separate", "shared"):
        cam_err = np.abs(out[name][0] - out["per-image"][0]).max()
        logit_err = np.abs(out[name][1] - out["per-image"][1]).max()
        print(f"max |{name} − per-image|: CAM {cam_err:.2e}, logit {logit_err:.2e}")
    same = np.array_equal(out["shared"][0], out["separate"][0]) and np.array_equal(out["shared"][1], out["separate"][1])
    print(f"shared forward vs separate logits forward (same batches): {'bit-identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
