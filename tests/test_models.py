"""Backbones: exact classifier-weight CAMs, token maps, dynamic sizes, local checkpoints, PCM."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_CNN, TINY_VIT

from training.config import NetConfig
from training.errors import CheckpointError, ConfigError
from training.models import Backbone, Projection, build_net, pcm_refine, tokens_to_map

NETS = {"vit": TINY_VIT, "cnn": TINY_CNN}


def _net(kind: str, *, seed: int = 0, image_size: int = 32, **changes) -> Backbone:
    torch.manual_seed(seed)
    cfg = NetConfig(**{**NETS[kind], **changes})
    return build_net(cfg, image_size=image_size).eval()


def _images(b: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
@torch.no_grad()
def test_weight_cam_is_exact(kind: str, hw: tuple[int, int]) -> None:
    """mean over positions of Σ_c w_c F_c (no relu) + bias == the logit timm itself computes."""
    net = _net(kind)
    x = _images(3, *hw)
    logits, fmap = net(x)
    w, b = net.classifier.weight[0], net.classifier.bias[0]
    cam_raw = torch.einsum("bchw,c->bhw", fmap, w)
    assert torch.allclose(cam_raw.mean((1, 2)) + b, logits[:, 0], atol=1e-5)
    # and Backbone's logits are timm's own forward (avg pool + linear head)
    assert torch.allclose(net.net(x), logits, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "hw", "expected"),
    [
        ("vit", (32, 32), (2, 32, 4, 4)),  # patch 8
        ("vit", (48, 64), (2, 32, 6, 8)),  # other sizes: position embeddings interpolated
        ("vit", (16, 40), (2, 32, 2, 5)),
        ("cnn", (32, 32), (2, 64, 4, 4)),  # output stride 8
        ("cnn", (48, 64), (2, 64, 6, 8)),
    ],
)
@torch.no_grad()
def test_feature_map_shapes(kind: str, hw: tuple[int, int], expected: tuple[int, ...]) -> None:
    net = _net(kind)
    logits, fmap = net(_images(2, *hw))
    assert tuple(fmap.shape) == expected
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    assert net.num_features == expected[1]


@pytest.mark.parametrize(
    ("prefix", "hw", "patch", "grid"),
    [
        (1, (32, 32), (8, 8), (4, 4)),
        (1, (32, 48), (8, 8), (4, 6)),
        (0, (16, 16), (4, 4), (4, 4)),
        (5, (8, 24), (8, 8), (1, 3)),
    ],
)
def test_tokens_to_map(prefix: int, hw: tuple[int, int], patch: tuple[int, int], grid: tuple[int, int]) -> None:
    h, w = grid
    tokens = torch.arange(2 * (prefix + h * w) * 3, dtype=torch.float32).reshape(2, prefix + h * w, 3)
    before = tokens.clone()
    fmap = tokens_to_map(tokens, prefix, hw, patch)
    assert fmap.shape == (2, 3, h, w)
    # raster order: token prefix + i·w + j is position (i, j)
    for i, j in [(0, 0), (h - 1, w - 1), (h // 2, w - 1)]:
        assert torch.equal(fmap[:, :, i, j], tokens[:, prefix + i * w + j])
    assert torch.equal(tokens, before)


def test_tokens_to_map_rejects_wrong_count() -> None:
    with pytest.raises(ValueError, match=r"expected 4×4 patch tokens, got 15"):
        tokens_to_map(torch.zeros(1, 16, 3), 1, (32, 32), (8, 8))


def test_vit_is_built_for_exact_cams() -> None:
    net = _net("vit")
    assert net.is_vit and net.net.global_pool == "avg"
    assert isinstance(net.net.fc_norm, torch.nn.Identity)
    assert not _net("cnn").is_vit


# ---------------------------------------------------------------- local checkpoints


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "safetensors"])
def test_pretrained_local_checkpoint(tmp_path: Path, kind: str, wrap: str) -> None:
    source = _net(kind, seed=1)
    state = source.net.state_dict()
    path = tmp_path / "w.pt"
    if wrap == "state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif wrap == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = _net(kind, seed=2, pretrained=str(path))
    for key, value in state.items():
        assert torch.equal(loaded.net.state_dict()[key], value), key


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_classifier_of_other_shape_is_skipped(tmp_path: Path, kind: str) -> None:
    spec = NETS[kind]
    extra = {"global_pool": "avg", "fc_norm": False, "img_size": 32} if kind == "vit" else {}
    torch.manual_seed(1)
    imagenet_like = timm.create_model(spec["name"], num_classes=10, **spec["options"], **extra)
    torch.save(imagenet_like.state_dict(), tmp_path / "in10.pth")
    fresh = _net(kind, seed=2)
    loaded = _net(kind, seed=2, pretrained=str(tmp_path / "in10.pth"))
    head = {f"{name}.{p}" for name in ("head", "fc") for p in ("weight", "bias")}
    source = imagenet_like.state_dict()
    for key, value in loaded.net.state_dict().items():
        if key in head:  # kept from the seeded init, not the 10-class checkpoint
            assert torch.equal(value, fresh.net.state_dict()[key]), key
            assert value.shape[0] == 1
        else:
            assert torch.equal(value, source[key]), key


def test_vit_checkpoint_of_other_image_size_is_resampled(tmp_path: Path) -> None:
    source = _net("vit", seed=1, image_size=64)  # 8×8 position grid
    torch.save(source.net.state_dict(), tmp_path / "vit64.pt")
    loaded = _net("vit", seed=2, image_size=32, pretrained=str(tmp_path / "vit64.pt"))  # 4×4 grid
    assert loaded.net.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(loaded.net.patch_embed.proj.weight, source.net.patch_embed.proj.weight)
    assert torch.equal(loaded.net.pos_embed[:, :1], source.net.pos_embed[:, :1])  # class token kept


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "checkpoint file does not exist"),
        (b"not a checkpoint at all", "not a readable checkpoint"),
        ({"conv.weight": torch.zeros(2, 2)}, "no weight matches model"),
    ],
)
def test_bad_checkpoint_names_the_path(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        _net("cnn", pretrained=str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(1, 64), "extra": Path("x")}, path)  # not a plain tensor dict
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        _net("cnn", pretrained=str(path))


# ---------------------------------------------------------------- names and options


@pytest.mark.parametrize(
    ("name", "suggestion"), [("resnet181", "resnet18"), ("vit_tiny_patch16_22", "vit_tiny_patch16_224")]
)
def test_unknown_model_name(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=rf'not a timm model \(did you mean "{suggestion}"\?\)'):
        build_net(NetConfig(name), image_size=32)


def test_bad_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"bad option in options=\{'no_such_kwarg': 1\}"):
        build_net(NetConfig("resnet10t", options={"no_such_kwarg": 1}), image_size=32)


def test_block_maps() -> None:
    vit, cnn = _net("vit"), _net("cnn")
    x = _images()
    with torch.no_grad():
        maps = vit.block_maps(x, (-2, -1))
        assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
        # the last block with the final norm is the feature map itself
        assert torch.allclose(maps[-1], vit.feature_map(x), atol=1e-5)
        assert torch.allclose(vit.block_maps(x, (0,))[0], maps[0], atol=1e-5)  # 0 == -2 at depth 2
        assert torch.equal(cnn.block_maps(x, (-1,))[0], cnn.feature_map(x))
    with pytest.raises(ConfigError, match=r"block indices in \[-2, 1\]"):
        vit.block_maps(x, (-3,))
    with pytest.raises(ConfigError, match="layer fusion needs a ViT"):
        cnn.block_maps(x, (-2, -1))


# ---------------------------------------------------------------- projection and PCM


def test_projection_shape() -> None:
    torch.manual_seed(0)
    proj = Projection(32, 2)
    assert proj(torch.randn(3, 32, 4, 5)).shape == (3, 2, 4, 5)
    assert proj.conv.bias is None


def _one_hot_features(h: int, w: int) -> torch.Tensor:
    """Every position has its own orthogonal feature vector: affinity = identity."""
    return torch.eye(h * w).reshape(1, h * w, h, w)


@pytest.mark.parametrize(
    ("fmap", "cam", "expected"),
    [
        # orthogonal features → no mixing: the CAM is returned (up to the 1e-5 guard)
        (_one_hot_features(2, 2), torch.tensor([[[1.0, 0.0], [0.5, 2.0]]]), torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])),
        # identical features everywhere → every position gets the mean (3.5 / 4)
        (torch.ones(1, 3, 2, 2), torch.tensor([[[1.0, 0.0], [0.5, 2.0]]]), torch.full((1, 2, 2), 0.875)),
        # two groups: {(0,0),(0,1)} along +x, {(1,0),(1,1)} along +y → mean within each group
        (
            torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]]),
            torch.tensor([[[1.0, 3.0], [0.0, 4.0]]]),
            torch.tensor([[[2.0, 2.0], [2.0, 2.0]]]),
        ),
        # opposite features have relu'd affinity 0 → no mixing
        (
            torch.tensor([[[[1.0, -1.0]]]]),
            torch.tensor([[[1.0, 5.0]]]),
            torch.tensor([[[1.0, 5.0]]]),
        ),
    ],
)
def test_pcm_refine_hand_cases(fmap: torch.Tensor, cam: torch.Tensor, expected: torch.Tensor) -> None:
    before = cam.clone()
    out = pcm_refine(cam, fmap)
    assert torch.allclose(out, expected, atol=1e-4)
    assert torch.equal(cam, before)


def test_pcm_refine_keeps_shape_and_sign() -> None:
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 8, 5, 6, generator=g)
    cam = torch.rand(3, 5, 6, generator=g)
    out = pcm_refine(cam, fmap)
    assert out.shape == cam.shape
    assert (out >= 0).all()
    # a weighted mean never exceeds the largest input
    assert (out.flatten(1).amax(1) <= cam.flatten(1).amax(1) + 1e-6).all()


def test_keep_stages_reads_the_cam_at_a_middle_stage() -> None:
    # tf_efficientnet_lite0 stages end at 16, 24, 40, 80, 112, 192, 320 channels; 5 stages → 112.
    # Output stride 8 at 64 px keeps the cut stage at 8×8, and the weight CAM stays exact there.
    net = build_net(NetConfig(name="tf_efficientnet_lite0", output_stride=8, stages=5), image_size=64)
    assert len(net.net.blocks) == 5 and net.num_features == 112
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, fmap = net.eval()(images)
        assert fmap.shape == (2, 112, 8, 8)
        cam_mean = torch.einsum("bchw,c->bhw", fmap, net.classifier.weight[0]).mean(dim=(1, 2))
        assert torch.allclose(cam_mean + net.classifier.bias, logits[:, 0], atol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (NetConfig(**TINY_CNN, stages=2), r"stages: expected an EfficientNet/MobileNet-style timm model .*got ResNet"),
        (NetConfig(name="tf_efficientnet_lite0", stages=7), r"stages: expected 1 to 6 for this model, got 7"),
    ],
)
def test_keep_stages_bad_input(cfg: NetConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_net(cfg, image_size=64)


@torch.no_grad()
def test_hybrid_vit_tokens_count_the_stems_stride() -> None:
    """timm's hybrid ViT (a ResNet stem, stride 4, then 2 px patches): 8 px per token, so 32 px → 4×4."""
    net = _net("vit", name="vit_tiny_r_s16_p8_224", options={"patch_size": 2, "depth": 1, "embed_dim": 32,
                                                               "num_heads": 2})  # fmt: skip
    assert net.patch == (8, 8)
    logits, fmap = net(_images(2, 32, 48))
    assert tuple(fmap.shape) == (2, 32, 4, 6) and logits.shape == (2, 1)
    cam_raw = torch.einsum("bchw,c->bhw", fmap, net.classifier.weight[0])
    assert torch.allclose(cam_raw.mean((1, 2)) + net.classifier.bias[0], logits[:, 0], atol=1e-5)  # avg head
