"""CAM variants of one finished trial, scored on its validation split (no retraining).

The trial writes the CAMs of its own ``cam`` section; this re-extracts the CAMs of
its trained network with other choices and scores each on the validation images
(``data.val_fraction`` of the trial's config), never on the test split:

- the feature layer: ``head`` (the last feature map, what the classifier reads; for a
  CNN with a linear head Grad-CAM there is the weight CAM up to a factor) or any
  module of the timm network by name (``blocks.5``, ``blocks.6`` …: Grad-CAM there);
- the per-scale normalisation: ``max`` (x / max, `training.cams.normalise`) or
  ``minmax`` ((x − min) / (max − min) after the ReLU, what the thesis's code computes);
- PCM (`training.models.pcm_refine` with the layer's own features) on or off;
- the scales, fused by the mean of the per-scale normalised maps.

One forward and one backward per batch and scale serve every layer and variant.
Prints one JSON line per variant (metrics of `training.metrics.cam_scores`, prefixed
``val_``), plus the all-smoke mask's miou as the floor.

Usage::

    .venv/bin/python benchmarks/cam_variants.py runs/bench/cnn --layers head,blocks.6,blocks.5
    .venv/bin/python benchmarks/cam_variants.py runs/bench/cnn --scales 1.0 --scales 0.5,1.0,1.5,2.0
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from training.cams import scaled_size
from training.config import load_trial_config
from training.data import EvalDataset
from training.evaluate import EvalSet
from training.loop import configure_threads
from training.metrics import cam_scores, miou
from training.models import Backbone, pcm_refine, tokens_to_map
from training.paradigms import build_paradigm
from training.trial import prepare_data
from training.trial_dir import TrialDir
from training.validation import load_validation


def layer_maps(net: Backbone, images: torch.Tensor, layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(activation, gradient of the smoke logit), each B×C×h×w, at every named layer."""
    modules = dict(net.net.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        if name == "head":
            continue

        def keep(_m, _i, out, name=name):
            out.retain_grad()
            captured[name] = out

        hooks.append(modules[name].register_forward_hook(keep))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            fmap = net.feature_map(x)
            fmap.retain_grad()
            net.logits_from(fmap).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        net.zero_grad(set_to_none=True)
    out = {"head": (fmap.detach(), fmap.grad)}
    for name, t in captured.items():
        if net.is_vit:  # B×N×D tokens → maps
            to_map = lambda u: tokens_to_map(u, net.net.num_prefix_tokens, images.shape[-2:], net.patch)
            out[name] = (to_map(t.detach()), to_map(t.grad))
        else:
            out[name] = (t.detach(), t.grad)
    return out


def grad_cam(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """B×h×w ReLU(Σ_c mean(∂y/∂A_c) · A_c)."""
    return F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1))


def normalise(cam: torch.Tensor, how: str, eps: float = 1e-5) -> torch.Tensor:
    flat = cam.flatten(1)
    if how == "max":
        return cam / flat.amax(1).clamp_min(eps)[:, None, None]
    low = flat.amin(1)[:, None, None]
    return (cam - low) / (flat.amax(1)[:, None, None] - low).clamp_min(eps)


def raw_cams(net, dataset, layers, scales, *, batch_size=16):
    """{(layer, scale, pcm): N×H×W un-normalised CAM at input size}."""
    out: dict[tuple, list[torch.Tensor]] = {}
    multiple = net.patch[0] if net.is_vit else 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        images = batch["image"]
        h, w = images.shape[-2:]
        for scale in scales:
            size = (scaled_size(h, scale, multiple), scaled_size(w, scale, multiple))
            x = images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False)
            for name, (act, grad) in layer_maps(net, x, layers).items():
                cam = grad_cam(act, grad)
                for pcm in (False, True):
                    c = pcm_refine(cam, act) if pcm else cam
                    c = F.interpolate(c[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
                    out.setdefault((name, scale, pcm), []).append(c)
    return {k: torch.cat(v) for k, v in out.items()}


def _resize(cam: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cam if cam.shape == hw else cv2.resize(cam, hw[::-1], interpolation=cv2.INTER_LINEAR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trial", type=Path, help="a finished trial folder (config.yaml, checkpoint/)")
    ap.add_argument("--layers", default="head", help="comma-separated: head and/or timm module names")
    ap.add_argument("--scales", action="append", help="comma-separated scale set; repeat for several")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="score N evenly spaced validation images (0: all)")
    ap.add_argument("--checkpoint", type=Path, help="another state.pt of the trial (e.g. an earlier epoch's copy)")
    args = ap.parse_args()
    configure_threads(args.threads)
    trial = TrialDir(args.trial)
    cfg = load_trial_config(trial.config)
    model = build_paradigm(cfg)
    state = torch.load(args.checkpoint or trial.state, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    net = model.cam_net.eval()
    val = load_validation(cfg.data, prepare_data(cfg.data))
    if val is None or val.scored is None:
        raise SystemExit(f"{args.trial}: its config has no validation split with masks (data.val_fraction)")
    ev = val.scored
    if args.limit:  # evenly spaced, so both classes stay in
        pick = np.linspace(0, len(ev.gts) - 1, min(args.limit, len(ev.gts))).astype(int).tolist()
        items = [ev.dataset.items[i] for i in pick]
        norm = {"image_size": cfg.data.image_size, "mean": cfg.data.mean, "std": cfg.data.std}
        ev = EvalSet(EvalDataset(items, **norm), [ev.gts[i] for i in pick], [ev.contexts[i] for i in pick])
    scale_sets = [tuple(float(s) for s in group.split(",")) for group in (args.scales or ["0.5,1.0,1.5,2.0"])]
    layers = args.layers.split(",")
    raw = raw_cams(net, ev.dataset, layers, sorted({s for group in scale_sets for s in group}))
    with torch.no_grad():
        logits = np.concatenate([net(b["image"])[0][:, 0].numpy() for b in torch.utils.data.DataLoader(ev.dataset, 64)])
    labels = np.asarray([item.label for item in ev.dataset.items])
    smoke = [i for i, g in enumerate(ev.gts) if g.any()]
    floor = miou([np.ones_like(ev.gts[i]) for i in smoke], [ev.gts[i] for i in smoke])
    print(json.dumps({"trial": str(args.trial), "val_images": len(ev.gts), "all_smoke_miou": floor}))
    for layer, group, how, pcm in itertools.product(layers, scale_sets, ("max", "minmax"), (False, True)):
        fused = sum(normalise(raw[(layer, s, pcm)], how) for s in group) / len(group)
        cams = [_resize(c.numpy(), g.shape) for c, g in zip(fused, ev.gts, strict=True)]
        scores = cam_scores(cams, ev.gts, ev.contexts, logits, labels, threshold=args.threshold)
        row = {"layer": layer, "scales": list(group), "norm": how, "pcm": pcm}
        print(json.dumps(row | {f"val_{k}": round(v, 4) for k, v in scores.items()}), flush=True)


if __name__ == "__main__":
    main()
