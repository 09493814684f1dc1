"""What the teacher-student target carries: how much of it is spatial, and how much the student matched.

For a teacher-student trial (its folder: config.yaml, checkpoint/state.pt), over its training
images (the validation split left out, as in training):

- ``const_share``: the share of the target's energy ``‖T‖²`` in its per-channel spatial mean,
  ``Σ_c h·w·mean(T_c)² / ‖T‖²``, per image, averaged; overall and per channel. The cosine of
  ``T`` with its own per-channel constant map is ``√const_share``, so a student whose projection
  is a constant map per channel already reaches ``1 − cos = 1 − √const_share`` of cosine·global:
  the part of the loss that can teach *where* is at most what is left;
- ``transfer_cos``: the cosine·global similarity the trained student's projection reaches;
  ``student_const_share``: the same share for the student's projection;
- ``smoke_corr``: the Pearson correlation, per smoke image, of the target's smoke channel (or of
  the student's projected channel 0) with the smoke mask at the map's resolution.

Prints one JSON object. Usage::

    .venv/bin/python benchmarks/teacher_target.py runs/bench/teacher_student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.config import load_trial_config
from training.loop import configure_threads
from training.paradigms import build_paradigm
from training.trial import ensure_teacher, load_splits, prepare_data


def const_share(maps: torch.Tensor) -> torch.Tensor:
    """B×C×h×w → B×(C+1): per channel and overall, the energy share of the spatial mean."""
    hw = maps.shape[-1] * maps.shape[-2]
    mean_energy = hw * maps.mean(dim=(2, 3)) ** 2  # B×C
    energy = (maps**2).sum(dim=(2, 3)).clamp_min(1e-12)  # B×C
    return torch.cat([mean_energy / energy, (mean_energy.sum(1) / energy.sum(1))[:, None]], dim=1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of B×N tensors (0 where either row is constant)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trial", type=Path, help="a finished teacher_student trial folder")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    configure_threads(1)
    cfg = load_trial_config(args.trial / "config.yaml")
    teacher = cfg.transfer.teacher_checkpoint or str(ensure_teacher(cfg))  # cached: not trained again
    model = build_paradigm(cfg.replace(**{"model.student.pretrained": "false"}), teacher).eval()
    state = torch.load(args.trial / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    root = prepare_data(cfg.data)
    train, _ = load_splits(cfg.data, root)
    items = train.items  # (path, label), the validation split already left out
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("t", "s", "cos", "t_corr", "s_corr", "label")}
    for start in range(0, len(train), args.batch_size):
        idx = range(start, min(start + args.batch_size, len(train)))
        images = torch.stack([train[i][0] for i in idx])
        labels = torch.tensor([int(train[i][1]) for i in idx])
        target = model.teacher_target(model.teacher.feature_map(images))
        student = model.proj_student(model.cam_net(images)[1])
        if student.shape[-2:] != target.shape[-2:]:
            student = F.interpolate(student, size=target.shape[-2:], mode="bilinear", align_corners=False)
        masks = torch.stack([_mask(items[i][0], root, target.shape[-2:]) for i in idx])
        rows["t"].append(const_share(target))
        rows["s"].append(const_share(student))
        rows["cos"].append(F.cosine_similarity(student.flatten(1), target.flatten(1), dim=1))
        rows["t_corr"].append(pearson(target[:, 0].flatten(1), masks.flatten(1)))
        rows["s_corr"].append(pearson(student[:, 0].flatten(1), masks.flatten(1)))
        rows["label"].append(labels)
    cat = {k: torch.cat(v) for k, v in rows.items()}
    smoke = cat["label"] == 1
    out = {
        "trial": str(args.trial), "images": len(train),
        "const_share": _stats(cat["t"][:, -1]), "const_share_per_channel": [_stats(c) for c in cat["t"][:, :-1].T],
        "student_const_share": _stats(cat["s"][:, -1]), "transfer_cos": _stats(cat["cos"]),
        "smoke_corr_target": _stats(cat["t_corr"][smoke]), "smoke_corr_student": _stats(cat["s_corr"][smoke]),
    }  # fmt: skip
    print(json.dumps(out))


def _mask(image: Path, root: Path, hw: tuple[int, int]) -> torch.Tensor:
    """The training image's smoke mask (zeros for a clean image) as the map's h×w share of smoke."""
    import cv2

    path = root / "train" / "masks" / f"{image.stem}.png"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None
    if mask is None:
        return torch.zeros(hw)
    small = cv2.resize((mask > 0).astype(np.float32), hw[::-1], interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small)


def _stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": round(values.mean().item(), 4), "median": round(values.median().item(), 4)}


if __name__ == "__main__":
    main()
