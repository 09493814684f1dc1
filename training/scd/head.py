"""The light segmentation head of SCD: SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021).

SCD (``network/segformer_head.py``, ``TSCD_model.py``) decodes the four stages of
a MiT-B1 encoder: a linear projection of each stage to ``width`` = 256 channels,
all resized to the finest stage, concatenated, fused by a 1×1 convolution with
BatchNorm and ReLU, Dropout2d(0.1), and a 1×1 classifier to K + 1 classes. Here
the inputs are any list of feature maps (for a ViT: some blocks' token maps,
all at the patch grid), so the same decoder serves CNN stages and ViT blocks.

Every 1×1 convolution is written as the ``nn.Linear`` over channels-last positions
that SegFormer's MLP is: the same function with the same initialisation, and on a
CPU several times cheaper than a convolution over maps of a few dozen positions
(the head's backward was a tenth of an SCD step at 64 px with convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config.scd import SCDConfig

HEAD_WIDTH = SCDConfig.head_width  # SCD's embedding_dim
HEAD_DROPOUT = SCDConfig.head_dropout


class SegmentationHead(nn.Module):
    """All-MLP decoder from several feature maps to per-pixel class logits.

    Args:
        in_channels: channels of each input map, in the order they are passed.
        num_classes: output classes including background (smoke: 2).
        width: channels of each projection and of the fused map.
        dropout: Dropout2d probability before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], *, num_classes: int = 2, width: int = HEAD_WIDTH,
                 dropout: float = HEAD_DROPOUT) -> None:
        super().__init__()
        if not in_channels or min(in_channels) < 1 or num_classes < 2 or width < 1:
            raise ValueError(f"SegmentationHead: expected in_channels ≥ 1 each, num_classes ≥ 2, width ≥ 1, got "
                             f"{list(in_channels)}, {num_classes}, {width}")
        self.project = nn.ModuleList(nn.Linear(c, width) for c in in_channels)
        self.fuse = nn.Linear(width * len(in_channels), width, bias=False)  # mmcv ConvModule: no bias with BN
        self.norm = nn.BatchNorm2d(width)  # SyncBN in SCD; one process here
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Linear(width, num_classes)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Args: maps, each B×C_i×h_i×w_i. Returns B×num_classes×h×w logits at the largest h×w."""
        if len(maps) != len(self.project):
            raise ValueError(f"SegmentationHead: expected {len(self.project)} feature maps, got {len(maps)}")
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        projected = []
        for proj, m in zip(self.project, maps, strict=True):
            p = _per_position(proj, m)
            projected.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                             if p.shape[-2:] != size else p)
        # SCD concatenates the coarsest stage first; the order only permutes the fuse weights
        fused = F.relu(self.norm(_per_position(self.fuse, torch.cat(projected, dim=1))))
        return _per_position(self.classify, self.dropout(fused))


def _per_position(linear: nn.Linear, x: Tensor) -> Tensor:
    """A B×C×h×w map through ``linear`` at every position: B×C'×h×w (a channels-last view)."""
    return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
