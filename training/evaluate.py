"""Test-split evaluation: CAM extraction, shards, metrics and the CAM gallery."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from training.cams import build_cam_method, multiscale_cams_and_logits
from training.config import CamConfig
from training.metrics import accuracy, cam_scores, masks_at, miou, subset_accuracy
from training.models import Backbone
from training.shards import CamShard


def _loader(dataset, batch_size: int, num_workers: int = 0, pin: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin)


@dataclass
class EvalSet:
    """The test split with its masks read once (they are reused every epoch)."""

    dataset: object  # a training.data.EvalDataset
    gts: list[np.ndarray]  # H×W bool smoke masks
    contexts: list[np.ndarray | None]  # H×W bool co-occurring-object masks
    subsets: list[str] | None = None  # e.g. "coupled" / "decoupled" (synthetic manifest), per image

    @classmethod
    def load(cls, dataset, subsets: list[str] | None = None) -> EvalSet:
        gts, ctxs = [], []
        for i in range(len(dataset)):
            _, mask, ctx = dataset.load_eval(i)
            gts.append(mask)
            ctxs.append(ctx)
        return cls(dataset, gts, ctxs, subsets)


@torch.no_grad()
def extract_cams(
    net: Backbone, evalset: EvalSet, cfg: CamConfig, device: torch.device, *, num_workers: int = 0
) -> CamShard:
    """Multi-scale CAMs for every test image, resized to the image's own size.

    Batched over images (``cfg.batch_size``); the only Python loops in the hot
    path run over the scales. The logits come from the scale-1 CAM's forward pass.

    Args:
        net: the CAM network (eval mode is set here).
        evalset: the test split and its masks (their sizes are the native sizes).
        cfg: CAM settings (method, scales, layers, batch size).
        num_workers: DataLoader workers decoding test images (pinned memory on CUDA).
    """
    net.eval()
    method = build_cam_method(cfg.method)
    ids, cams, logits, labels = [], [], [], []
    for batch in _loader(evalset.dataset, cfg.batch_size, num_workers, device.type == "cuda"):
        images = batch["image"].to(device, non_blocking=True)
        cam, logit = multiscale_cams_and_logits(net, images, cfg, method=method)
        logits.append(logit[:, 0].float().cpu())
        cams.extend(cam.cpu().numpy())
        ids.extend(batch["id"])
        labels.append(batch["label"])
    cams = [_resize(c, g.shape) for c, g in zip(cams, evalset.gts, strict=True)]
    return CamShard(ids, cams, torch.cat(logits).numpy(), torch.cat(labels).numpy().astype(np.int64))


def _resize(cam: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cam if cam.shape == hw else cv2.resize(cam, hw[::-1], interpolation=cv2.INTER_LINEAR)


def score(camset: CamShard, evalset: EvalSet, threshold: float) -> dict[str, float]:
    """Every CAM metric of `training.metrics.cam_scores` for this set, plus the
    accuracy per test subset when the dataset names them (coupled / decoupled)."""
    scores = cam_scores(camset.cams, evalset.gts, evalset.contexts, camset.logits, camset.labels, threshold=threshold)
    if evalset.subsets is not None:
        scores |= subset_accuracy(camset.logits, camset.labels, evalset.subsets)
    return scores


@torch.no_grad()
def quick_eval(
    net: Backbone, evalset: EvalSet, cam: CamConfig, device: torch.device, *, num_workers: int = 0
) -> dict[str, float]:
    """Cheap per-epoch numbers: accuracy and single-scale mIoU with the trial's own CAM.

    The trial's whole CAM config (method, normalisation, fused layers, threshold) at
    scale 1 only, so the per-epoch curve, and an ASHA scheduler reading it, measure the
    CAM the final metrics measure, at a quarter of the scales' cost.
    """
    cfg = dataclasses.replace(cam, scales=(1.0,))
    camset = extract_cams(net, evalset, cfg, device, num_workers=num_workers)
    smoke = [i for i, g in enumerate(evalset.gts) if g.any()]
    preds = masks_at([camset.cams[i] for i in smoke], cam.threshold)
    return {
        "test_accuracy": accuracy(camset.logits, camset.labels),
        "test_miou_1x": miou(preds, [evalset.gts[i] for i in smoke]) if smoke else 0.0,
    }


def overlay(rgb: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None, *, alpha: float = 0.45) -> np.ndarray:
    """Heat-map overlay of a CAM on its image, with the ground-truth outline.

    Args:
        rgb: H×W×3 uint8 RGB. cam: H×W float in [0,1]. mask: H×W bool or None.
    Returns:
        H×W×3 uint8 RGB.
    """
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = (rgb.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out = np.ascontiguousarray(out)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def gallery_indices(labels: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` images, spread over the set, smoke images first then clean ones."""
    smoke = np.flatnonzero(labels == 1)
    clean = np.flatnonzero(labels == 0)
    k_smoke = min(len(smoke), max(n - n // 4, n - len(clean)))
    pick = lambda idx, k: idx[np.linspace(0, len(idx) - 1, k).astype(int)].tolist() if k else []
    return pick(smoke, k_smoke) + pick(clean, min(len(clean), n - k_smoke))


def save_gallery(camset: CamShard, evalset: EvalSet, out_dir: Path, n: int) -> list[Path]:
    """Write ``n`` overlay PNGs (image | CAM overlay side by side)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in gallery_indices(camset.labels, n):
        rgb, mask, _ = evalset.dataset.load_eval(i)
        pair = np.concatenate([rgb, overlay(rgb, camset.cams[i], mask)], axis=1)
        path = out_dir / f"{camset.ids[i]}.png"
        cv2.imwrite(str(path), pair[..., ::-1])
        paths.append(path)
    return paths
