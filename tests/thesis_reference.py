"""The thesis's formulas, written out independently of `training/` as the test oracle.

A direct transcription of what the thesis's public code computes (zhang-mickey/Master-thesis,
`lib/utils/metrics.py: compute_similarity`, `lib/utils/pseudo_label.py`, `post_processing/CRF.py`;
written out in the project's METHOD notes), kept deliberately naive: no shared helpers with the
code under test, loops where the thesis loops, so an error in `training.losses` cannot hide in
a helper both use. s = student map, t = teacher map, both B×C×N (N = h·w) unless said.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def flat(x: Tensor) -> Tensor:
    """B×C×h×w → B×C×N (the thesis's ``x.view(B, C, -1)``)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def cosine_global(s: Tensor, t: Tensor) -> Tensor:
    """``1 − mean_b cos(s_b.flatten(), t_b.flatten())``."""
    return 1 - F.cosine_similarity(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), dim=1).mean()


def cosine_spatial(s: Tensor, t: Tensor) -> Tensor:
    """``1 − mean_{b,n} cos(s_b[:, n], t_b[:, n])``: over channels at each position."""
    return 1 - F.cosine_similarity(flat(s).permute(0, 2, 1), flat(t).permute(0, 2, 1), dim=-1).mean()


def cosine_channel(s: Tensor, t: Tensor) -> Tensor:
    """``1 − mean_{b,i,j} cos(s_b[i, :], t_b[j, :])`` over all C_s × C_t channel pairs."""
    s, t = flat(s), flat(t)
    sims = [
        F.cosine_similarity(s[b, i], t[b, j], dim=0) for b in range(s.shape[0]) for i in range(s.shape[1])
        for j in range(t.shape[1])
    ]  # fmt: skip
    return 1 - torch.stack(sims).mean()


def _channel_mean(x: Tensor) -> Tensor:
    return flat(x).mean(dim=1)  # B×N


def spatial_map(s: Tensor, t: Tensor, metric: str) -> Tensor:
    """The channel-mean maps m (B×N): cosine ``1 − mean_b cos``, l1 ``mean |m_s − m_t|``,
    l2 ``mean_b ‖m_s,b − m_t,b‖₂``."""
    ms, mt = _channel_mean(s), _channel_mean(t)
    if metric == "cosine":
        return 1 - F.cosine_similarity(ms, mt, dim=1).mean()
    if metric == "l1":
        return (ms - mt).abs().mean()
    if metric == "l2":
        return torch.stack([torch.sqrt(((ms[b] - mt[b]) ** 2).sum()) for b in range(ms.shape[0])]).mean()
    raise ValueError(metric)


def gram_columns(s: Tensor, t: Tensor) -> Tensor:
    """``G = x xᵀ`` per sample (C×C); ``1 − mean_{b,k} cos(G_s[b, :, k], G_t[b, :, k])``."""
    gs = torch.bmm(flat(s), flat(s).transpose(1, 2))
    gt = torch.bmm(flat(t), flat(t).transpose(1, 2))
    columns = [(b, k) for b in range(gs.shape[0]) for k in range(gs.shape[2])]
    sims = [F.cosine_similarity(gs[b, :, k], gt[b, :, k], dim=0) for b, k in columns]
    return 1 - torch.stack(sims).mean()


def l1_global(s: Tensor, t: Tensor) -> Tensor:
    """``mean over all elements |s − t|``."""
    return (s - t).abs().mean()


def l2_global(s: Tensor, t: Tensor) -> Tensor:
    """``mean_b ‖s_b − t_b‖₂`` of the flattened per-sample difference (a norm, not its square)."""
    d = (s - t).reshape(s.shape[0], -1)
    return torch.stack([torch.sqrt((d[b] ** 2).sum()) for b in range(d.shape[0])]).mean()


def logits(zs: Tensor, zt: Tensor, metric: str) -> Tensor:
    """B×K logits: l1 ``mean |z_s − z_t|``, l2 ``mean_b ‖z_s − z_t‖₂``, cosine ``1 − mean cos``."""
    if metric == "l1":
        return (zs - zt).abs().mean()
    if metric == "l2":
        return torch.stack([torch.sqrt(((zs[b] - zt[b]) ** 2).sum()) for b in range(zs.shape[0])]).mean()
    if metric == "cosine":
        return 1 - F.cosine_similarity(zs, zt, dim=1).mean()
    raise ValueError(metric)


# Every (metric, level) pair the thesis code defines on feature maps, by our names.
FEATURE_PAIRS = {
    ("cosine", "global"): cosine_global,
    ("cosine", "spatial"): cosine_spatial,
    ("cosine", "channel"): cosine_channel,
    ("cosine", "spatial_map"): lambda s, t: spatial_map(s, t, "cosine"),
    ("l1", "spatial_map"): lambda s, t: spatial_map(s, t, "l1"),
    ("l2", "spatial_map"): lambda s, t: spatial_map(s, t, "l2"),
    ("cosine", "gram"): gram_columns,
    ("l1", "global"): l1_global,
    ("l2", "global"): l2_global,
}


def minmax_cam(cam: Tensor) -> Tensor:
    """``pseudo_label.py``: ReLU, then per image ``(cam − min) / (max − min + 1e-8)``; B×h×w."""
    cam = F.relu(cam)
    lo = cam.reshape(cam.shape[0], -1).min(dim=1).values[:, None, None]
    hi = cam.reshape(cam.shape[0], -1).max(dim=1).values[:, None, None]
    return (cam - lo) / (hi - lo + 1e-8)


# `post_processing/CRF.py`: the unary's background exponent, kernels before the scale factor,
# iterations, and the foreground-probability decision (the CAM threshold, not the argmax).
CRF_THESIS = {"alpha": 48.0, "gauss_sxy": 3.0, "gauss_compat": 5.0, "bilateral_sxy": 60.0, "bilateral_srgb": 5.0,
              "bilateral_compat": 15.0, "iters": 5, "fg_threshold": 0.3}  # fmt: skip
ORACLE_STEPS = 101  # `np.linspace(0, 1, 101)`
