"""One backbone of a trial (or of a pre-training run), named as timm names it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.config import names
from training.config.parse import at_least, one_of
from training.errors import ConfigError


@dataclass(frozen=True)
class NetConfig:
    """One backbone, created by name through ``timm.create_model``."""

    name: str = "resnet50"
    pretrained: str = "false"  # "false", "true" (timm's hub), a checkpoint file, or a PRETRAINED_WEIGHTS name
    output_stride: int = 16  # CNNs only: 8, 16 or 32
    pcm: bool = False  # CNNs only: refine CAMs with the pixel correlation module
    options: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs
    stages: int = 0  # EfficientNet-style CNNs: keep the first N stages, CAM read there (training.models); 0 = all
    head: str = "avg"  # ViTs only, a names.VIT_HEADS name: "token" (the thesis, timm's own) or "avg"

    @property
    def is_vit(self) -> bool:
        """A vision transformer (by its timm family, `names.VIT_FAMILIES`), else a CNN."""
        return names.is_vit(self.name)

    def check(self, path: str) -> None:
        if not self.name:
            raise ConfigError(f"{path}.name: expected a timm model name")
        one_of(self.output_stride, (8, 16, 32), f"{path}.output_stride")
        at_least(self.stages, 0, f"{path}.stages")
        names.check_pretrained(self.pretrained, self.name, field=f"{path}.pretrained")
        names.VIT_HEADS.check(self.head, field=f"{path}.head")
        if self.head != "avg" and not self.is_vit:
            raise ConfigError(f"{path}.head: {self.head!r} needs a ViT (a class token); {self.name} is a CNN, "
                              "whose head is always the mean of its last features; remove the key")
