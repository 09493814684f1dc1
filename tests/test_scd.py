import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from training.errors import ConfigError
from training.scd import (
    SCDConfig,
    SegmentationHead,
    balanced_seg_loss,
    correspondence_features,
    correspondence_loss,
    correspondence_loss_at,
    energy_loss,
    pseudo_labels,
    scale_equivariance_loss,
)
from training.scd.correspondence import sample_at
from training.scd.losses import gaussian_affinity_apply


def _vectors(*points: tuple[float, ...]) -> torch.Tensor:
    """1×C×N from N C-vectors."""
    return torch.tensor(points, dtype=torch.float32).T[None]


def _constant(vector: tuple[float, ...], size: int) -> torch.Tensor:
    return torch.tensor(vector).view(1, -1, 1, 1).expand(1, -1, size, size).clone()


# --------------------------------------------------------------------------- correspondence


def test_correspondence_loss_by_hand():
    # features: â = [(1, 0), (0.6, 0.8)] against â' = [(1, 0), (0, 1)] → F = [[1, 0], [0.6, 0.8]]
    # global mean 0.6, row means [0.5, 0.7] → centred + 0.6 = [[1.1, 0.1], [0.5, 0.7]]
    feats, feats_small = _vectors((1, 0), (0.6, 0.8)), _vectors((1, 0), (0, 1))
    # codes ŝ = [(1, 0), (0, 1)], ŝ' = [(1, 0), (1, 0)] → C = [[1, 1], [0, 0]]
    # loss = mean(−C · F) = −(1.1 + 0.1) / 4 = −0.3 (without the centring it would be −0.25)
    codes = _vectors((1, 0), (0, 1))
    loss = correspondence_loss_at(feats, feats_small, codes, _vectors((1, 0), (1, 0)))
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    # ŝ' = [(1, 0), (−1, 0)] → C = [[1, −1], [0, 0]], clamped to [[1, 0], [0, 0]] → −1.1 / 4
    loss = correspondence_loss_at(feats, feats_small, codes, _vectors((1, 0), (-1, 0)))
    assert loss.item() == pytest.approx(-0.275, abs=1e-6)
    # lengths do not matter: every vector is L2-normalised first
    loss = correspondence_loss_at(3 * feats, 0.5 * feats_small, 7 * codes, _vectors((2, 0), (-9, 0)))
    assert loss.item() == pytest.approx(-0.275, abs=1e-6)


def test_the_mean_put_back_is_the_batch_mean():
    # sample 1 as above, F₁ = [[1, 0], [0.6, 0.8]]; sample 2: every vector (1, 0), F₂ = 1 everywhere.
    # global mean over both: (2.4 + 4) / 8 = 0.8. Sample 1 centred + 0.8 = [[1.3, 0.3], [0.7, 0.9]],
    # sample 2 centred + 0.8 = 0.8 everywhere. C₁ = [[1, 1], [0, 0]], C₂ = 1 everywhere.
    # loss = −(1.3 + 0.3 + 4 · 0.8) / 8 = −0.6
    ones = _vectors((1, 0), (1, 0))
    feats = torch.cat([_vectors((1, 0), (0.6, 0.8)), ones])
    feats_small = torch.cat([_vectors((1, 0), (0, 1)), ones])
    codes = torch.cat([_vectors((1, 0), (0, 1)), ones])
    codes_small = torch.cat([ones, ones])
    assert correspondence_loss_at(feats, feats_small, codes, codes_small).item() == pytest.approx(-0.6, abs=1e-6)


def _plain_correspondence(feats, feats_small, codes, codes_small):
    """The loss as the module docstring writes it, with autograd doing the gradient."""
    fd = F.normalize(feats, dim=1).transpose(1, 2) @ F.normalize(feats_small, dim=1)
    fd = (fd - fd.mean(dim=2, keepdim=True) + fd.mean()).detach()
    cd = F.normalize(codes, dim=1).transpose(1, 2) @ F.normalize(codes_small, dim=1)
    return -(cd.clamp(min=0) * fd).mean()


@pytest.mark.parametrize("channels", [2, 3])  # 2: the sorted half-plane path; 3: the blockwise path
def test_the_fast_loss_and_gradient_equal_the_plain_formula(channels):
    gen = torch.Generator().manual_seed(3)
    feats, feats_small = torch.rand(3, 4, 30, generator=gen), torch.rand(3, 4, 20, generator=gen)
    codes = torch.randn(3, channels, 30, generator=gen, dtype=torch.float64)
    codes_small = torch.randn(3, channels, 20, generator=gen, dtype=torch.float64)
    codes[0, :, 0] = 0  # a zero code, and two equal angles: no special case
    codes_small[1, :, 3] = 2 * codes_small[1, :, 4]
    codes.requires_grad_(), codes_small.requires_grad_()
    fast = correspondence_loss_at(feats.double(), feats_small.double(), codes, codes_small)
    plain = _plain_correspondence(feats.double(), feats_small.double(), codes, codes_small)
    torch.testing.assert_close(fast, plain)
    for a, b in zip(torch.autograd.grad(fast, (codes, codes_small)),
                    torch.autograd.grad(plain, (codes, codes_small)), strict=True):
        torch.testing.assert_close(a, b)


def test_correspondence_loss_on_constant_maps_by_hand():
    # wherever the points fall: F = ⟨(1, 0), (1, 1)/√2⟩ = 1/√2 for every pair (centring changes
    # nothing), C = ⟨(3, 4)/5, (0, 1)⟩ = 0.8, so the loss is −0.8/√2 = −0.5657
    feats, feats_small = _constant((1.0, 0.0), 9), _constant((1.0, 1.0), 3)
    codes = _constant((3.0, 4.0), 9).requires_grad_()
    loss = correspondence_loss(feats, feats_small, codes, _constant((0.0, 1.0), 3), points=5)
    assert loss.item() == pytest.approx(-0.8 / math.sqrt(2), abs=1e-6)
    # opposite codes, C = −0.8 < 0: clamped, so no loss and no push
    codes_small = _constant((0.0, -1.0), 3).requires_grad_()
    loss = correspondence_loss(feats, feats_small, codes, codes_small, points=5)
    loss.backward()
    assert loss.item() == 0.0 and codes.grad.abs().max() == 0 and codes_small.grad.abs().max() == 0


def _random_views(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 2, 16, 16, generator=gen), torch.rand(2, 2, 5, 5, generator=gen),
            torch.randn(2, 2, 16, 16, generator=gen), torch.randn(2, 2, 5, 5, generator=gen))


def test_the_generator_makes_the_points_deterministic():
    views = _random_views()
    first = correspondence_loss(*views, points=8, generator=torch.Generator().manual_seed(7))
    again = correspondence_loss(*views, points=8, generator=torch.Generator().manual_seed(7))
    other = correspondence_loss(*views, points=8, generator=torch.Generator().manual_seed(8))
    assert first.item() == again.item() and first.item() != other.item()


def test_gradient_reaches_the_head_side_only():
    feats, feats_small, codes, codes_small = (t.requires_grad_() for t in _random_views())
    loss = correspondence_loss(feats, feats_small, codes, codes_small, points=6,
                               generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert feats.grad is None and feats_small.grad is None
    assert codes.grad.abs().sum() > 0 and codes_small.grad.abs().sum() > 0


def test_points_sample_bilinearly_with_the_corners_at_plus_minus_one():
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    # (x, y): (−1, −1) top-left, (1, −1) top-right, (1, 1) bottom-right, (0, 0) the centre
    coords = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]).view(1, 1, 4, 2)
    torch.testing.assert_close(sample_at(maps, coords)[0, 0], torch.tensor([0.0, 3.0, 11.0, 5.5]))


def test_a_single_cam_gets_its_complement_as_background():
    cam = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(correspondence_features(cam), torch.cat([1 - cam, cam], dim=1))
    many = torch.rand(2, 3, 4, 4)
    assert correspondence_features(many) is many


def test_bad_points_and_batches_are_rejected():
    views = _random_views()
    with pytest.raises(ConfigError, match="points"):
        correspondence_loss(*views, points=0)
    with pytest.raises(ValueError, match="batch"):
        correspondence_loss(views[0][:1], *views[1:])


# --------------------------------------------------------------------------- equivariance


def test_scale_equivariance_by_hand():
    # align_corners=True resizing 4×4 → 2×2 keeps the corners: [[0, 3], [12, 15]] / 15,
    # against zeros: mean = (0 + 3 + 12 + 15) / 15 / 4 = 0.5
    cam = (torch.arange(16.0) / 15).view(1, 1, 4, 4).requires_grad_()
    small = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = scale_equivariance_loss(cam, small)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert cam.grad.abs().sum() > 0 and small.grad.abs().sum() > 0  # the caller decides what to detach
    with pytest.raises(ValueError, match="B×K"):
        scale_equivariance_loss(cam, torch.zeros(1, 2, 2, 2))


# --------------------------------------------------------------------------- pseudo labels


def test_pseudo_label_ignore_band_without_refinement():
    # cam along a row: 0, 0.1, …, 1.0 and the two thresholds themselves.
    # smoke iff cam > 0.55 (beats the high background score), background iff cam ≤ 0.35
    # (the low score wins or ties), ignored in between
    values = [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.7, 1.0]
    cam = torch.tensor(values).view(1, 1, 1, -1)
    image = torch.zeros(1, 3, 1, len(values))
    cam_before = cam.clone()
    labels = pseudo_labels(image, cam, refine=None)
    assert labels.dtype == torch.int64 and labels.shape == (1, 1, len(values))
    assert labels[0, 0].tolist() == [0, 0, 0, 0, 0, 255, 255, 255, 1, 1, 1]
    torch.testing.assert_close(cam, cam_before, rtol=0, atol=0)
    # other scores move the band
    assert pseudo_labels(image, cam, high=0.75, low=0.15, refine=None)[0, 0].tolist() == \
        [0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 1]


def test_pseudo_labels_pick_the_present_class_that_wins():
    cam = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4]]).view(1, 2, 1, 3)
    image = torch.zeros(1, 3, 1, 3)
    assert pseudo_labels(image, cam, refine=None)[0, 0].tolist() == [1, 2, 255]
    # class 1 absent from the image: its pixel falls to class 2 where that still clears a score
    only_second = torch.tensor([[False, True]])
    assert pseudo_labels(image, cam, present=only_second, refine=None)[0, 0].tolist() == [0, 2, 255]
    as_floats = torch.tensor([[0.0, 1.0]])  # image labels as the data loader gives them
    assert pseudo_labels(image, cam, present=as_floats, refine=None)[0, 0].tolist() == [0, 2, 255]
    nothing = torch.tensor([[False, False]])
    assert pseudo_labels(image, cam, present=nothing, refine=None)[0, 0].tolist() == [0, 0, 0]


def test_varm_pseudo_labels_snap_to_the_image_edge():
    # 64 px, dark left half, bright right half; the CAM crosses 0.5 at column 26, six columns
    # on the wrong side of the edge at 32
    gen = torch.Generator().manual_seed(0)
    image = torch.full((1, 3, 64, 64), 40 / 255)
    image[..., 32:] = 200 / 255
    image = (image + torch.randn(image.shape, generator=gen) * 4 / 255).clamp(0, 1)
    cam = torch.sigmoid((torch.arange(64.0) - 26) / 4).expand(1, 1, 64, 64).clone()
    unrefined = pseudo_labels(image, cam, refine=None)
    # unrefined: ignored columns 24-26, smoke from column 27, 5 columns into the dark side
    assert (unrefined[0, 32] == 255).nonzero().flatten().tolist() == [24, 25, 26]
    assert (unrefined[..., :32] == 1).any()
    refined = pseudo_labels(image, cam)  # VARM at 32×32, as SCD
    assert not (refined[..., :32] == 1).any()  # no smoke on the dark side
    assert (refined[..., 34:] == 1).all()  # the bright side is smoke
    assert (refined[..., :22] == 0).all()


def test_pseudo_label_input_errors():
    with pytest.raises(ConfigError, match="bg_low"):
        pseudo_labels(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), high=0.3, low=0.5)
    with pytest.raises(ConfigError, match="down_scale"):
        pseudo_labels(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), down_scale=0)
    with pytest.raises(ValueError, match="present"):
        pseudo_labels(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), present=torch.ones(1, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- segmentation losses


def test_balanced_seg_loss_by_hand():
    # pixels: logits (0, 0) label 0: CE ln 2 = 0.693147; (2, 0) label 0: ln(1 + e⁻²) = 0.126928;
    # (0, 1) label 1: ln(1 + e⁻¹) = 0.313262; (5, −5) ignored.
    # background half (0.693147 + 0.126928) / 2 = 0.410038, foreground half 0.313262
    logits = torch.tensor([[0.0, 2.0, 0.0, 5.0], [0.0, 0.0, 1.0, -5.0]]).view(1, 2, 1, 4)
    labels = torch.tensor([0, 0, 1, 255]).view(1, 1, 4)
    assert balanced_seg_loss(logits, labels).item() == pytest.approx(0.5 * (0.410038 + 0.313262), abs=1e-5)
    # no foreground pixel: that half counts 0 (SCD's cross entropy would be NaN)
    no_fg = torch.tensor([0, 0, 255, 255]).view(1, 1, 4)
    assert balanced_seg_loss(logits, no_fg).item() == pytest.approx(0.5 * 0.410038, abs=1e-5)


def test_gaussian_affinity_matches_the_explicit_double_sum():
    gen = torch.Generator().manual_seed(0)
    image, values = torch.rand(2, 3, 4, 3, generator=gen) * 255, torch.rand(2, 2, 4, 3, generator=gen)
    expected = torch.zeros_like(values)
    for b in range(2):
        for i in range(12):
            for j in range(12):
                (yi, xi), (yj, xj) = divmod(i, 3), divmod(j, 3)
                colour = ((image[b, :, yi, xi] - image[b, :, yj, xj]) ** 2).sum() / 15**2
                w = torch.exp(-0.5 * (((yi - yj) ** 2 + (xi - xj) ** 2) / 2.0**2 + colour))
                expected[b, :, yi, xi] += w * values[b, :, yj, xj]
    out = gaussian_affinity_apply(image, values, sigma_rgb=15.0, sigma_xy=2.0, chunk=10)  # several chunks
    torch.testing.assert_close(out, expected)


def test_energy_loss_value_gate_and_reference_gradient():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 4, 4, generator=gen) * 255
    logits = torch.randn(2, 2, 4, 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, 2, (2, 4, 4), generator=gen)
    labels[:, 0] = 255
    loss = energy_loss(image, logits, labels, scale=1.0, sigma_xy=3.0, weight=1.0)
    # by hand: gate = 1 on the ignored row, else 1 − max_k S; L = −Σ S · gate · W S / B;
    # SCD's gradient w.r.t. S is −2 · gate · W S / B (gate and W S held fixed)
    probs = logits.softmax(dim=1)
    gate = torch.where(labels == 255, 1.0, 1 - probs.max(dim=1).values).detach()[:, None]
    filtered = gaussian_affinity_apply(image, probs.detach(), sigma_rgb=15.0, sigma_xy=3.0) * gate
    assert loss.item() == pytest.approx(-(probs * filtered).sum().item() / 2, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected,) = torch.autograd.grad(-2 * (probs * filtered).sum() / 2, logits)
    torch.testing.assert_close(grad, expected)


def test_energy_vanishes_where_the_head_is_sure_of_its_label():
    logits = torch.tensor([20.0, -20.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4).clone()
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    assert energy_loss(torch.rand(1, 3, 4, 4) * 255, logits, labels, scale=1.0).item() == pytest.approx(0.0)
    # the same prediction on ignored pixels still feels the full pairwise term
    assert energy_loss(torch.rand(1, 3, 4, 4) * 255, logits, labels + 255, scale=1.0).item() < 0


# --------------------------------------------------------------------------- head


def test_segmentation_head_fuses_maps_of_any_resolution():
    torch.manual_seed(0)
    head = SegmentationHead([8, 16], num_classes=2, width=12)
    maps = [torch.randn(3, 8, 8, 8, requires_grad=True), torch.randn(3, 16, 4, 4, requires_grad=True)]
    out = head(maps)
    assert out.shape == (3, 2, 8, 8)
    out.square().mean().backward()
    assert all(m.grad.abs().sum() > 0 for m in maps)
    with pytest.raises(ValueError, match="2 feature maps"):
        head(maps[:1])


# --------------------------------------------------------------------------- settings


def test_defaults_are_the_public_codes_values():
    cfg = SCDConfig()
    assert (cfg.cls_weight, cfg.seg_weight, cfg.energy_weight, cfg.corr_weight, cfg.equivariance_weight) == \
        (1.0, 0.1, 0.01, 0.1, 0.1)
    assert (cfg.points, cfg.scale, cfg.bg_high, cfg.bg_low, cfg.warmup_fraction) == (40, 0.3, 0.55, 0.35, 0.1)
    assert (cfg.varm_dilations, cfg.varm_iters) == ((1, 2, 4, 8, 12, 24), 10)
    assert (cfg.varm_w_rgb, cfg.varm_w_var) == (0.25, 0.01)
    assert (cfg.head_width, cfg.energy_sigma_rgb, cfg.energy_sigma_xy, cfg.energy_scale) == (256, 15, 100, 0.5)
    cfg.check()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.points = 8


def test_warm_up_trains_the_classifier_alone():
    cfg = SCDConfig()  # 10% of 100 steps: steps 0-9 classification only
    assert cfg.loss_weights(9, 100) == {"cls": 1.0, "seg": 0.0, "energy": 0.0, "corr": 0.0, "equivariance": 0.0}
    assert cfg.loss_weights(10, 100) == {"cls": 1.0, "seg": 0.1, "energy": 0.01, "corr": 0.1, "equivariance": 0.1}
    assert SCDConfig(warmup_fraction=0.0).loss_weights(0, 100)["corr"] == 0.1


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"corr_weight": -1.0}, "scd.corr_weight"), ({"points": 0}, "scd.points"), ({"scale": 1.0}, "scd.scale"),
     ({"bg_low": 0.6}, "bg_low"), ({"varm_iters": -1}, "scd.varm_iters"), ({"varm_w_var": 1.0}, "scd.varm_w_var"),
     ({"varm_dilations": (0,)}, "scd.varm_dilations"), ({"warmup_fraction": 1.5}, "scd.warmup_fraction"),
     ({"head_width": 0}, "scd.head_width"), ({"energy_scale": 0.0}, "scd.energy_scale")],
)
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        SCDConfig(**changes).check()
