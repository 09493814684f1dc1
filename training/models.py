"""Backbones through ``timm.create_model`` by name, seen the way CAMs need them.

A CNN here is a classifier whose logits are ``linear(mean(F))`` over its last
feature map ``F`` (B×C×h×w), which makes the classifier-weight CAM exact: the
spatial mean of ``w·F`` plus the bias is the logit. A ViT classifies either from
its class token (``head: token``, timm's and the thesis's choice; Grad-CAM then)
or, like the CNN, from the mean of its patch tokens (``head: avg``: timm's
``global_pool='avg'`` with ``fc_norm=False``, and the weight CAM is exact again).
Whether a name is a ViT is decided once, from its timm family
(`training.config.names.VIT_FAMILIES` via `NetConfig.is_vit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import write_torch
from training.config import NetConfig
from training.config.names import check_pretrained, pretrained_kind
from training.errors import CheckpointError, ConfigError, did_you_mean
from training.weights import map_by_order, packaged_weights

NUM_CLASSES = 1  # one smoke logit, trained with BCE on image labels
KeyAdapter = Callable[..., dict[str, torch.Tensor]]  # (state, net, *, origin) → net's state dict


class Backbone(nn.Module):
    """A timm classifier exposing its last feature map and its linear classifier.

    Args:
        net: a timm model (ResNet-like with ``forward_features`` → B×C×h×w, or a
            VisionTransformer built with average pooling).
        is_vit: ``net`` is a vision transformer (`NetConfig.is_vit`, decided from its name).
        pcm: refine CAMs with the training-free pixel correlation module.
    """

    def __init__(self, net: nn.Module, *, is_vit: bool, pcm: bool = False, head: str = "avg") -> None:
        super().__init__()
        self.net = net
        self.pcm = pcm
        self.is_vit = is_vit
        self.head = head  # "avg" or, for a ViT, "token"
        self.channels_last = False

    def use_channels_last(self) -> Backbone:
        """CNNs only: keep weights and inputs in NHWC memory format, which cuDNN's
        tensor-core convolutions prefer (bf16/fp16 on recent GPUs). A ViT is left
        as it is: its convolution is one patch embedding."""
        if not self.is_vit:
            self.net.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    @property
    def num_features(self) -> int:
        return self.classifier.in_features

    @property
    def classifier(self) -> nn.Linear:
        return self.net.get_classifier()

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W normalised images → B×C×h×w last features (ViT: patch tokens)."""
        feats = self._features(images)
        return self._patch_map(feats, images) if self.is_vit else feats

    def logits_from(self, fmap: torch.Tensor) -> torch.Tensor:
        """B×C×h×w → B×K logits, as the head computes them from the mean feature.

        Raises:
            ConfigError: a ViT that classifies from its class token (no map gives its logits).
        """
        if self.head != "avg":
            raise ConfigError("logits from a feature map need an average-pooled head; this ViT has head: token")
        return self.classifier(fmap.mean(dim=(2, 3)))

    def classifier_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The smoke classifier applied at every position: B×C×h×w → B×1×h×w, ``w·F + b``
        (its spatial mean is the logit when the head averages)."""
        w, b = self.classifier.weight, self.classifier.bias
        out = F.conv2d(fmap, w.to(fmap.dtype)[:, :, None, None])
        return out if b is None else out + b.to(fmap.dtype)[None, :, None, None]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (B×K logits, B×C×h×w feature map)."""
        feats = self._features(images)
        if self.is_vit:  # timm's own head: the class token, or the mean of the patch tokens
            return self.net.forward_head(feats), self._patch_map(feats, images)
        return self.logits_from(feats), feats

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(images)

    def _patch_map(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(tokens, self.net.num_prefix_tokens, images.shape[-2:], self.patch)

    @property
    def patch(self) -> tuple[int, int]:
        """Pixels per token (h, w): the patch size, times the stem's stride for a hybrid ViT (a conv stem)."""
        return tuple(self.net.patch_embed.feat_ratio(as_scalar=False))

    def forward_with_blocks(
        self, images: torch.Tensor, blocks: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """One forward pass giving the logits, the last feature map and the maps a dense head reads.

        Args:
            images: B×3×H×W normalised images.
            blocks: ViT blocks (0-based) whose token maps to return, each with the final
                LayerNorm (as `block_maps`); ignored for a CNN, whose last map is returned.

        Returns:
            (B×K logits, B×C×h×w last features, one B×C×h×w map per block; a CNN: ``[last features]``).
        """
        if not self.is_vit:
            logits, fmap = self(images)
            return logits, fmap, [fmap]
        final, maps = self.net.forward_intermediates(images, indices=blocks, norm=True, output_fmt="NCHW")
        return self.net.forward_head(final), self._patch_map(final, images), maps

    def block_maps(self, images: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Feature maps of the given blocks (ViT) or stages (CNN), each B×C×h×w.

        ViT blocks get the final LayerNorm so the classifier weights apply to
        them; CNN stages only match the classifier at the last stage.
        """
        if not self.is_vit:
            if set(layers) - {-1}:
                raise ConfigError(f"cam.layers: layer fusion needs a ViT (equal widths per block); got {list(layers)}")
            return [self.feature_map(images)]
        depth = len(self.net.blocks)
        idx = [i if i >= 0 else depth + i for i in layers]
        if min(idx) < 0 or max(idx) >= depth:
            raise ConfigError(f"cam.layers: expected block indices in [-{depth}, {depth - 1}], got {list(layers)}")
        return self.net.forward_intermediates(
            images, indices=idx, norm=True, output_fmt="NCHW", intermediates_only=True
        )


def tokens_to_map(
    tokens: torch.Tensor, num_prefix: int, image_hw: tuple[int, int], patch: tuple[int, int]
) -> torch.Tensor:
    """B×(P+N)×D ViT tokens → B×D×h×w, dropping the P prefix (class) tokens."""
    h, w = image_hw[0] // patch[0], image_hw[1] // patch[1]
    patches = tokens[:, num_prefix:]
    if patches.shape[1] != h * w:
        raise ValueError(f"expected {h}×{w} patch tokens, got {patches.shape[1]}")
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def build_net(cfg: NetConfig, *, image_size: int, num_classes: int = NUM_CLASSES) -> Backbone:
    """Create the backbone named in ``cfg`` and load its weights.

    Args:
        cfg: the network config (timm name, pretrained mode, output stride, options).
        image_size: training input side; ViT position embeddings are built for it
            and interpolated on the fly at other sizes (multi-scale CAMs).
        num_classes: outputs of the linear head (pre-training on K classes; trials use 1).
    """
    if not timm.is_model(cfg.name):
        raise ConfigError(f"model name {cfg.name!r}: not a timm model{did_you_mean(cfg.name, timm.list_models())}")
    if cfg.pretrained.startswith("pretrain:"):  # a bug, not input: `run_trial` resolves these first
        raise CheckpointError(f"pretrained={cfg.pretrained!r}: resolve it with training.pretrain.resolve_pretrained")
    kwargs = dict(cfg.options)
    kwargs["num_classes"] = num_classes
    if cfg.is_vit:
        pool = "avg" if cfg.head == "avg" else "token"
        kwargs.update(global_pool=pool, fc_norm=False, dynamic_img_size=True, img_size=image_size)
    else:
        kwargs.setdefault("output_stride", cfg.output_stride)
    hub = cfg.pretrained.lower() == "true"
    try:
        net = timm.create_model(cfg.name, pretrained=hub, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model {cfg.name!r}: bad option in options={cfg.options}: {err}") from None
    except Exception as err:
        if not hub:
            raise
        raise CheckpointError(
            f"model {cfg.name!r}: pretrained=true could not load timm's weights ({err}); "
            "with no network, set pretrained to a local checkpoint file instead"
        ) from None
    kind = pretrained_kind(cfg.pretrained)
    if kind == "file":
        load_weights(net, Path(cfg.pretrained).expanduser(), is_vit=cfg.is_vit)
    elif kind == "name":
        check_pretrained(cfg.pretrained, cfg.name, field="pretrained")
        load_weights(net, packaged_weights(cfg.pretrained).path(), is_vit=cfg.is_vit, adapter=map_by_order)
    if cfg.stages:
        keep_stages(net, cfg.stages)
    return Backbone(net, is_vit=cfg.is_vit, pcm=cfg.pcm, head=cfg.head)


def keep_stages(net: nn.Module, n: int) -> nn.Module:
    """Cut a timm EfficientNet/MobileNet after its first ``n`` stages, in place.

    The later stages, ``conv_head`` and its norm go; a new smoke classifier reads the
    n-th stage's output, so that map is the feature map, the CAM and the transfer
    target. At 64 px the last stages of an ImageNet EfficientNet see far more than the
    whole image (output stride 8 dilates them), and their CAM is spread over the frame;
    a middle stage still localises (docs/results.md, "Choosing trials/bench.yaml").

    Raises:
        ConfigError: the model has no ``blocks``/``conv_head`` layout, or ``n`` is not
            below its number of stages.
    """
    if not all(hasattr(net, a) for a in ("blocks", "conv_head", "bn2", "classifier")):
        raise ConfigError(
            f"stages: expected an EfficientNet/MobileNet-style timm model (blocks + conv_head), "
            f"got {type(net).__name__}; set stages: 0"
        )
    if not 0 < n < len(net.blocks):
        raise ConfigError(f"stages: expected 1 to {len(net.blocks) - 1} for this model, got {n}")
    net.blocks = net.blocks[:n]
    width = _stage_width(net.blocks[-1])
    net.conv_head, net.bn2 = nn.Identity(), nn.Identity()
    net.classifier = nn.Linear(width, NUM_CLASSES)
    net.num_features = net.head_hidden_size = width
    return net


def _stage_width(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def load_weights(net: nn.Module, path: Path, *, is_vit: bool, adapter: KeyAdapter | None = None) -> None:
    """Load a local checkpoint (.pth/.pt/.bin with ``weights_only``, or .safetensors).

    Without ``adapter``: tensors whose key and shape match the model are loaded, the
    rest skipped (classifier weights of another shape, e.g. ImageNet's 1000 classes);
    ViT position embeddings are resampled to the model's grid (``is_vit``). A backbone
    written by `save_backbone_checkpoint` (a pre-training run, head dropped) loads
    strictly: every weight but the classifier's must be there with its shape. With ``adapter``
    (e.g. `training.weights.map_by_order` for another library's key names): the
    adapter renames and checks every tensor and the result is loaded strictly.

    Raises:
        CheckpointError: the file is missing or unreadable, shares no weight with
            the model, or (with ``adapter``) does not fit it tensor for tensor.
    """
    state = read_state_dict(path)
    if isinstance(state, dict) and state.get("format") == BACKBONE_FORMAT:
        return _load_backbone(net, state["state_dict"], path, is_vit=is_vit)
    state = _unwrap(state)
    if adapter is not None:
        net.load_state_dict(adapter(state, net, origin=str(path)), strict=True)
        return
    if is_vit:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, net)
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise CheckpointError(
            f"{path}: no weight matches model {type(net).__name__}; expected a state dict of this "
            f"architecture (first keys: {list(state)[:3]})"
        )
    net.load_state_dict(fitting, strict=False)


BACKBONE_FORMAT = "wsss-backbone"


def classifier_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the model's linear head (``head.weight``, ``fc.bias``, …)."""
    head = net.get_classifier()
    prefix = next(name for name, module in net.named_modules() if module is head)
    return {k for k in net.state_dict() if k.startswith(f"{prefix}.")}


def save_backbone_checkpoint(net: nn.Module, path: Path, *, meta: dict) -> None:
    """Write a timm model's weights without its classifier (a pre-training head of K
    classes means nothing to a trial), plus a small metadata dict."""
    head = classifier_keys(net)
    weights = {k: v for k, v in net.state_dict().items() if k not in head}
    write_torch({"format": BACKBONE_FORMAT, "meta": meta, "state_dict": weights}, path)  # full disk: OSError (ENOSPC)


def _load_backbone(net: nn.Module, weights: dict[str, torch.Tensor], path: Path, *, is_vit: bool) -> None:
    if is_vit:
        from timm.models.vision_transformer import checkpoint_filter_fn

        weights = checkpoint_filter_fn(weights, net)  # position embeddings to this grid
    own, head = net.state_dict(), classifier_keys(net)
    missing = [k for k in own if k not in weights and k not in head]
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in weights if k not in own or k in head]
    problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} here"
                 for k, v in weights.items() if k in own and own[k].shape != v.shape]  # fmt: skip
    if problems:
        raise CheckpointError(
            f"{path}: the pre-trained backbone does not fit this network ({len(problems)} problems, first: "
            f"{problems[0]}); check the network config matches the one it was pre-trained with"
        )
    net.load_state_dict(weights, strict=False)  # only the classifier stays as initialised


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict safely: never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def _unwrap(state: object) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items() if torch.is_tensor(v)}


class Projection(nn.Module):
    """Learnable 1×1 conv into the shared transfer space.

    Without a bias by default: when both sides project (``teacher_target: projection``), a
    bias alone could make both sides equal constants and the loss trivially zero. Against
    the thesis's fixed teacher target the student's projection has one, as there.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)
        nn.init.normal_(self.conv.weight, std=1.0 / math.sqrt(in_channels))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.conv(fmap)


def pcm_refine(cam: torch.Tensor, fmap: torch.Tensor, *, power: float = 2.0) -> torch.Tensor:
    """Training-free pixel correlation module (SEAM's PCM without its learned convs).

    Each position's activation becomes the affinity-weighted mean of all positions,
    the affinity being the ReLU'd cosine similarity of their features.

    Args:
        cam: B×h×w non-negative CAM.
        fmap: B×C×h×w features at the CAM's resolution.
    Returns:
        B×h×w refined CAM.
    """
    b, _, h, w = fmap.shape
    f = F.normalize(fmap.flatten(2), dim=1)  # B×C×N
    aff = F.relu(f.transpose(1, 2) @ f).pow(power)  # B×N×N
    aff = aff / (aff.sum(dim=1, keepdim=True) + 1e-5)
    return (cam.reshape(b, 1, h * w) @ aff).reshape(b, h, w)
