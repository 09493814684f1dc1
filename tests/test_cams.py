"""CAMs: every registered method, multi-scale averaging, layer fusion, Grad-CAM vs weight CAM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CNN, TINY_VIT

from training.cams import CAM_METHODS, multiscale_cams, normalise, scaled_size, weight_cam
from training.config import CamConfig, NetConfig
from training.errors import ConfigError
from training.models import Backbone, build_net

NETS = {"vit": TINY_VIT, "cnn": TINY_CNN, "cnn_pcm": {**TINY_CNN, "pcm": True}}
GRID = {"vit": 8, "cnn": 1, "cnn_pcm": 1}  # input multiple (patch size / none)


def _net(kind: str, seed: int = 0) -> Backbone:
    """A tiny net whose CAMs on `_images` are positive at about half the positions.

    At initialisation every position's features share one dominant direction, so the
    raw CAM often has one sign everywhere (all zero after the relu, which would make
    most checks here vacuous); projecting that mean direction out of the classifier
    weights gives mixed signs, deterministically.
    """
    torch.manual_seed(seed)
    net = build_net(NetConfig(**NETS[kind]), image_size=32).eval()
    with torch.no_grad():
        mean = net.feature_map(_images(4, 32, 40, seed=99)).mean((0, 2, 3))
        w = net.classifier.weight[0]
        w -= (w @ mean) / (mean @ mean) * mean
    return net


def _images(b: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("method", CAM_METHODS.names())
def test_every_method_runs(kind: str, method: str) -> None:
    net = _net(kind)
    x = _images(3, 32, 48)
    before = x.clone()
    cam = CAM_METHODS.get(method)(net, x, ())
    assert cam.shape == (3, 4, 6)
    assert (cam >= 0).all() and torch.isfinite(cam).all()
    assert (cam.flatten(1) > 0).any(1).all()
    if kind != "cnn_pcm":  # not vacuous: the relu clipped part (PCM then spreads mass everywhere)
        assert (cam == 0).any()
    assert torch.equal(x, before)
    assert all(p.grad is None for p in net.parameters())  # Grad-CAM leaves no gradients behind


def test_registry_has_the_documented_methods() -> None:
    assert CAM_METHODS.names() == ["gradcam", "weight"]
    with pytest.raises(ConfigError, match=r"unknown CAM method 'wieght' \(did you mean \"weight\"\?\)"):
        CAM_METHODS.get("wieght")


@pytest.mark.parametrize(
    ("size", "scale", "multiple", "expected"),
    [
        (32, 1.0, 8, 32),
        (32, 0.5, 8, 16),
        (32, 0.75, 8, 24),
        (32, 0.6, 8, 16),  # 19.2 px → 2.4 patches → 2 patches
        (32, 0.1, 8, 8),  # never below one patch
        (32, 1.5, 8, 48),
        (48, 2.0, 16, 96),
        (30, 0.5, 1, 15),
        (30, 1.3, 1, 39),
    ],
)
def test_scaled_size(size: int, scale: float, multiple: int, expected: int) -> None:
    assert scaled_size(size, scale, multiple) == expected


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("method", CAM_METHODS.names())
def test_multiscale_cams(monkeypatch: pytest.MonkeyPatch, kind: str, method: str) -> None:
    net = _net(kind)
    x = _images(2, 32, 40)
    before = x.clone()
    seen: list[tuple[int, int]] = []
    real = CAM_METHODS.get(method)

    def spy(n, images, layers):
        seen.append(tuple(images.shape[-2:]))
        return real(n, images, layers)

    monkeypatch.setitem(CAM_METHODS._entries, method, spy)
    cfg = CamConfig(method=method, scales=(0.5, 1.0, 1.3))
    cam = multiscale_cams(net, x, cfg)
    assert cam.shape == (2, 32, 40) and cam.dtype == torch.float32
    assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
    assert torch.equal(x, before)
    m = GRID[kind]
    assert seen == [(scaled_size(32, s, m), scaled_size(40, s, m)) for s in (0.5, 1.0, 1.3)]
    if kind == "vit":
        # 1.3 · 40 px = 6.5 patches → Python's round-half-to-even → 6 patches = 48 px
        assert seen == [(16, 16), (32, 40), (40, 48)]
        assert all(h % 8 == 0 and w % 8 == 0 for h, w in seen)


def test_multiscale_single_scale_is_the_normalised_resized_cam() -> None:
    net = _net("cnn")
    x = _images()
    with torch.no_grad():
        cam = multiscale_cams(net, x, CamConfig(scales=(1.0,)))
        raw = weight_cam(net, x)
    expected = normalise(F.interpolate(raw[:, None], (32, 32), mode="bilinear", align_corners=False)[:, 0])
    assert torch.allclose(cam, expected, atol=1e-6)
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(2), atol=1e-5)  # each image peaks at 1


def test_multiscale_average_of_two_scales() -> None:
    net = _net("vit")
    x = _images()
    with torch.no_grad():
        both = multiscale_cams(net, x, CamConfig(scales=(1.0, 2.0)))
        one = multiscale_cams(net, x, CamConfig(scales=(1.0,)))
        two = multiscale_cams(net, x, CamConfig(scales=(2.0,)))
    assert torch.allclose(both, (one + two) / 2, atol=1e-6)


@torch.no_grad()
def test_layer_fusion_on_vit() -> None:
    net = _net("vit")
    x = _images()
    fused = weight_cam(net, x, (-2, -1))
    w = net.classifier.weight[0]
    per_block = [normalise(F.relu(torch.einsum("bchw,c->bhw", f, w))) for f in net.block_maps(x, (-2, -1))]
    expected = normalise((per_block[0] + per_block[1]) / 2)
    assert fused.shape == (2, 4, 4)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert fused.max() <= 1 + 1e-6
    # a single layer is the plain CAM of that block (last block = the usual CAM)
    assert torch.allclose(weight_cam(net, x, (-1,)), weight_cam(net, x), atol=1e-5)
    cam = multiscale_cams(net, x, CamConfig(scales=(1.0, 0.5), layers=(-2, -1)))
    assert cam.shape == (2, 32, 32) and 0 <= cam.min() and cam.max() <= 1 + 1e-6


def test_layer_fusion_rejected_where_unsupported() -> None:
    x = _images()
    with pytest.raises(ConfigError, match="layer fusion needs a ViT"):
        weight_cam(_net("cnn"), x, (-2, -1))
    with pytest.raises(ConfigError, match="only implemented for method 'weight'"):
        CAM_METHODS.get("gradcam")(_net("vit"), x, (-1,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcam_on_cnn_is_proportional_to_weight_cam(seed: int) -> None:
    """With an avg-pool + linear head, d logit / d F_c = w_c / (h·w): Grad-CAM = weight CAM / (h·w)."""
    net = _net("cnn", seed)
    x = _images(3, 32, 40, seed=seed)
    grad = CAM_METHODS.get("gradcam")(net, x, ())
    with torch.no_grad():
        weight = weight_cam(net, x)
    assert (weight > 0).any() and (weight == 0).any()
    assert torch.allclose(grad * (4 * 5), weight, rtol=1e-4, atol=1e-5)
    assert torch.allclose(normalise(grad), normalise(weight), atol=1e-4)


def test_gradcam_on_vit_at_other_sizes() -> None:
    net = _net("vit")
    for h, w in [(32, 32), (48, 64), (16, 40)]:
        cam = CAM_METHODS.get("gradcam")(net, _images(2, h, w), ())
        assert cam.shape == (2, h // 8, w // 8) and (cam >= 0).all()


@pytest.mark.parametrize(
    ("cam", "expected"),
    [
        (torch.tensor([[[0.0, 2.0], [1.0, 4.0]]]), torch.tensor([[[0.0, 0.5], [0.25, 1.0]]])),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)),  # an empty CAM stays empty (no 0/0)
        (torch.tensor([[[3.0]], [[0.5]]]), torch.tensor([[[1.0]], [[1.0]]])),  # per image
    ],
)
def test_normalise(cam: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.allclose(normalise(cam), expected)
