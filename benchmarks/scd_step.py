"""SCD's extra cost: VARM per call, and an SCD step against a ViT-baseline step, side by side.

1. One VARM (and PAR) call on one 3×S×S image and a 2-channel map (background,
   smoke), S = 64 and 256: milliseconds per call.
2. The CPU preset's ViT (``search_spaces/trials/cpu.yaml``, ``model.student``) at
   batch 32, 64 px: a baseline step (forward, BCE, backward) against an SCD step
   composed by hand from ``training.scd`` (phase 1's measurement, before the paradigm;
   the paradigm's own step, in the trial's loop, is timed by ``train_step.py --preset bench``):
   both views through the ViT, the head on every block's map, the weight CAM
   (no gradient) of each view, VARM pseudo labels, the balanced segmentation
   loss, the energy loss, the correspondence loss and the equivariance term, one
   backward. No optimiser step in either. The second view is ``scale`` × 64 px
   rounded to the patch size (the ViT needs a multiple of its patch). Two SCD
   variants: ``SCDConfig()`` (the paper's settings) and a CPU-sized one.
3. The SCD terms alone (forward + backward where they have a gradient), to
   show where the time goes, and the reference's multi-scale flipped CAM
   (scales 1, 0.5, 1.5 of the full view, no gradient), which SCD recomputes each step.

Variants are interleaved round by round (``_common.interleaved``); figures are medians.

Usage::

    .venv/bin/python benchmarks/scd_step.py                  # 1 thread, 5 rounds
    .venv/bin/python benchmarks/scd_step.py --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import interleaved, machine, median

CPU_TRIAL = Path(__file__).resolve().parents[1] / "search_spaces" / "trials" / "cpu.yaml"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def per_call_ms(fn, *, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def refinement_costs(repeats: int) -> None:
    from postproc.par import par_refine
    from postproc.varm import varm_refine

    gen = torch.Generator().manual_seed(0)
    print(f"{'one call, 1×3×S×S image, 2-channel map':<44} {'S=64 ms':>9} {'S=256 ms':>9}")
    for name, refine in (("varm_refine (10 iters, dilations 1-24)", varm_refine),
                         ("par_refine (10 iters, dilations 1-24)", par_refine)):
        cells = []
        for size in (64, 256):
            image, cam = torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 2, size, size, generator=gen)
            cells.append(per_call_ms(lambda image=image, cam=cam, refine=refine: refine(image, cam), repeats=repeats))
        print(f"{name:<44} {cells[0]:9.1f} {cells[1]:9.1f}")


def build_student(image_size: int):
    from training.config import NetConfig
    from training.models import build_net

    spec = yaml.safe_load(CPU_TRIAL.read_text())["model"]["student"]
    torch.manual_seed(0)
    return build_net(NetConfig(name=spec["name"], options=spec.get("options", {})), image_size=image_size), spec


def view(net, images):
    """Class logits, the weight CAM in [0, 1] at the image size (no gradient), every block's map."""
    depth = len(net.net.blocks)
    _, maps = net.net.forward_intermediates(images, indices=list(range(depth)), norm=True, output_fmt="NCHW")
    logits = net.logits_from(maps[-1])
    with torch.no_grad():
        cam = F.relu(torch.einsum("bchw,c->bhw", maps[-1], net.classifier.weight[0]))[:, None]
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)  # SCD's per-image min-max
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-5)
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits, cam, maps


def scd_step(net, head, images, labels, cfg, gen, *, small_size: int):
    from postproc.varm import varm_refine
    from training.scd import (
        balanced_seg_loss,
        correspondence_features,
        correspondence_loss,
        energy_loss,
        pseudo_labels,
        scale_equivariance_loss,
    )

    small = F.interpolate(images, size=(small_size, small_size), mode="bilinear", align_corners=True)
    logits, cam, maps = view(net, images)
    _, cam_small, maps_small = view(net, small)  # SCD ignores the second view's class logits
    size = images.shape[-2:]
    seg = F.interpolate(head(maps), size=size, mode="bilinear", align_corners=True)
    seg_small = F.interpolate(head(maps_small), size=small.shape[-2:], mode="bilinear", align_corners=True)
    rgb = (images * STD + MEAN).clamp(0, 1)
    with torch.no_grad():
        refine = partial(varm_refine, dilations=cfg.varm_dilations, iters=cfg.varm_iters, w_rgb=cfg.varm_w_rgb,
                         w_var=cfg.varm_w_var)
        target = pseudo_labels(rgb, cam, high=cfg.bg_high, low=cfg.bg_low, present=labels[:, None] > 0.5,
                               refine=refine, down_scale=cfg.label_down_scale)
    w = cfg.loss_weights(10**9, 1)  # after the warm-up: every term
    loss = (
        w["cls"] * F.binary_cross_entropy_with_logits(logits[:, 0], labels)
        + w["seg"] * balanced_seg_loss(seg, target)
        + w["energy"] * energy_loss(rgb * 255, seg, target, sigma_rgb=cfg.energy_sigma_rgb,
                                    sigma_xy=cfg.energy_sigma_xy, scale=cfg.energy_scale)
        + w["corr"] * correspondence_loss(correspondence_features(cam), correspondence_features(cam_small), seg,
                                          seg_small, points=cfg.points, generator=gen)
        + w["equivariance"] * scale_equivariance_loss(cam, cam_small)
    )
    loss.backward()


def term_pieces(net, cfg, images, *, small_size: int) -> dict:
    """Each SCD term alone on random inputs of the step's shapes, and the reference's multi-scale CAM."""
    from training.scd import SegmentationHead, correspondence_loss, energy_loss, pseudo_labels

    bs, size = images.shape[0], images.shape[-1]
    patch, depth, width = net.patch[0], len(net.net.blocks), net.num_features
    head = SegmentationHead([width] * depth, num_classes=2, width=cfg.head_width).train()
    small_head = SegmentationHead([width] * depth, num_classes=2, width=64).train()
    gen, corr_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    rgb = torch.rand(bs, 3, size, size, generator=gen)
    cam = torch.rand(bs, 1, size, size, generator=gen)
    cam_small = torch.rand(bs, 1, small_size, small_size, generator=gen)
    seg = torch.randn(bs, 2, size, size, generator=gen, requires_grad=True)
    seg_small = torch.randn(bs, 2, small_size, small_size, generator=gen, requires_grad=True)
    target = pseudo_labels(rgb, cam)
    feats, feats_small = torch.cat([1 - cam, cam], 1), torch.cat([1 - cam_small, cam_small], 1)
    maps = [torch.randn(bs, width, size // patch, size // patch, generator=gen, requires_grad=True)
            for _ in range(depth)]

    def term(fn):
        def run() -> None:
            fn().backward()
        return run

    def multi_scale_cam() -> None:
        with torch.no_grad():
            for s in (1.0, 0.5, 1.5):
                side = max(patch, round(size * s / patch) * patch)
                view(net, F.interpolate(torch.cat([images, images.flip(-1)]), size=(side, side), mode="bilinear",
                                        align_corners=False))

    def second_view() -> None:
        net.zero_grad(set_to_none=True)
        small = F.interpolate(images, size=(small_size, small_size), mode="bilinear", align_corners=True)
        view(net, small)[2][-1].mean().backward()

    return {
        f"second view {small_size} px through the ViT (fwd + bwd)": second_view,
        f"head, width {cfg.head_width}, on {depth} block maps (fwd + bwd)": term(lambda: head(maps).mean()),
        f"head, width 64, on {depth} block maps (fwd + bwd)": term(lambda: small_head(maps).mean()),
        f"pseudo labels (VARM at {size // 2}², 2 thresholds)": lambda: pseudo_labels(rgb, cam),
        f"pseudo labels (VARM at {size // 4}², 2 thresholds)": lambda: pseudo_labels(rgb, cam, down_scale=4),
        f"correspondence loss, points {cfg.points} (fwd + bwd)": term(
            lambda: correspondence_loss(feats, feats_small, seg, seg_small, points=cfg.points, generator=corr_gen)),
        "correspondence loss, points 16 (fwd + bwd)": term(
            lambda: correspondence_loss(feats, feats_small, seg, seg_small, points=16, generator=corr_gen)),
        f"energy loss, scale {cfg.energy_scale} (fwd + bwd)": term(lambda: energy_loss(rgb * 255, seg, target)),
        "energy loss, scale 0.25 (fwd + bwd)": term(lambda: energy_loss(rgb * 255, seg, target, scale=0.25)),
        "reference multi-scale flipped CAM (no grad)": multi_scale_cam,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from training.scd import SCDConfig, SegmentationHead

    print(f"machine: {machine()}")
    refinement_costs(repeats=args.rounds)

    cfg = SCDConfig()
    net, spec = build_student(args.image_size)
    patch = net.patch[0]
    small_size = max(patch, round(args.image_size * cfg.scale / patch) * patch)
    depth, width = len(net.net.blocks), net.num_features
    net.train()
    bs, size = args.batch_size, args.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(bs, 3, size, size, generator=gen)
    labels = (torch.rand(bs, generator=gen) < 0.6).float()
    corr_gen = torch.Generator().manual_seed(1)

    def baseline() -> None:
        net.zero_grad(set_to_none=True)
        logits, _ = net(images)
        F.binary_cross_entropy_with_logits(logits[:, 0], labels).backward()

    def scd(variant: SCDConfig):
        variant_head = SegmentationHead([width] * depth, num_classes=2, width=variant.head_width).train()

        def run() -> None:
            net.zero_grad(set_to_none=True)
            variant_head.zero_grad(set_to_none=True)
            scd_step(net, variant_head, images, labels, variant, corr_gen, small_size=small_size)
        return run

    # smaller settings that a CPU preset could choose (phase 2 decides): fewer points, the energy and
    # VARM on smaller maps, a narrower head
    cpu_sized = dataclasses.replace(cfg, points=16, energy_scale=0.25, label_down_scale=4, head_width=64)
    steps = {
        "baseline ViT step (fwd + bwd)": baseline,
        "SCD step, SCDConfig() defaults": scd(cfg),
        "SCD step, points 16, energy 0.25, labels 1/4, head 64": scd(cpu_sized),
    }

    pieces = term_pieces(net, cfg, images, small_size=small_size)
    for run in (*steps.values(), *pieces.values()):  # warm-up: allocator, oneDNN kernel choice
        run()
    step_times = interleaved(steps, args.rounds, torch.device("cpu"))
    piece_times = interleaved(pieces, args.rounds, torch.device("cpu"))

    print(f"student {spec['name']} {spec.get('options', {})}: {size}×{size}, batch {bs}, "
          f"second view {small_size} px (scale {cfg.scale} rounded to the {patch} px patch), "
          f"{args.rounds} rounds, threads {torch.get_num_threads()}")
    ref = median(step_times["baseline ViT step (fwd + bwd)"])
    print(f"{'variant':<58} {'s':>8} {'× baseline':>11}")
    for name, ts in (*step_times.items(), *piece_times.items()):
        print(f"{name:<58} {median(ts):8.3f} {median(ts) / ref:11.2f}")
    for name in list(steps)[1:]:
        ratio = median(step_times[name]) / ref
        print(f"goal (issue 15): SCD step ≤ 2 × baseline step: {'met' if ratio <= 2 else 'NOT met'} "
              f"({ratio:.2f}) for '{name}'")


if __name__ == "__main__":
    main()
