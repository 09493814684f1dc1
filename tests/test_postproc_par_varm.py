import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from postproc.neighbours import RING, dilated_neighbours, neighbour_distances, neighbour_offsets, propagate
from postproc.par import par_refine, par_refine_np, par_weights
from postproc.varm import local_variation, varm_refine, varm_refine_np, varm_weights
from training.errors import ConfigError

REFINERS = {"par": par_refine, "varm": varm_refine}
S = 32


def _edge_scene(size: int = S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark left half and a bright right half (a sharp vertical edge at size/2), and a seed CAM
    that rises smoothly from column 12 on, so it spills across the edge into the dark side."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.full((1, 3, size, size), 40 / 255)
    image[..., size // 2 :] = 200 / 255
    image = (image + torch.randn(image.shape, generator=gen) * 4 / 255).clamp(0, 1)
    cam = torch.sigmoid((torch.arange(size, dtype=torch.float32) - 12) / 2.5).expand(1, 1, size, size).clone()
    return image, cam


def _spill(cam: torch.Tensor) -> float:
    """Mean activation on the 8 dark columns next to the edge (should be background)."""
    return cam[0, 0, :, S // 2 - 8 : S // 2].mean().item()


def _bright_share(cam: torch.Tensor) -> float:
    """Share of the CAM's mass on the bright (correct) side of the edge."""
    return (cam[0, 0, :, S // 2 :].sum() / cam.sum()).item()


# --------------------------------------------------------------------------- neighbourhoods


def test_dilated_neighbours_equal_a_one_hot_dilated_convolution():
    # the references' formulation: replicate-pad by d, then a 3×3 one-hot kernel per neighbour
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    kernel = torch.zeros(8, 1, 3, 3, dtype=torch.float64)
    for k, (dy, dx) in enumerate(RING):
        kernel[k, 0, dy + 1, dx + 1] = 1
    dilations = [1, 2, 5]
    expected = torch.cat(
        [F.conv2d(F.pad(x, [d] * 4, mode="replicate").reshape(6, 1, 7 + 2 * d, 9 + 2 * d), kernel, dilation=d)
         .view(2, 3, 8, 7, 9) for d in dilations],
        dim=2,
    )
    torch.testing.assert_close(dilated_neighbours(x, dilations), expected, rtol=0, atol=0)


def test_dilations_wider_than_the_image_clamp_the_coordinates():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    out = dilated_neighbours(x, [12])
    for k, (dy, dx) in enumerate(neighbour_offsets([12])):
        for i in range(3):
            for j in range(4):
                assert out[0, 0, k, i, j] == x[0, 0, min(max(i + dy, 0), 2), min(max(j + dx, 0), 3)]


def test_neighbour_order_and_distances():
    assert neighbour_offsets([2])[:4] == [(-2, -2), (-2, 0), (-2, 2), (0, -2)]
    r2 = math.sqrt(2)
    torch.testing.assert_close(
        neighbour_distances([1, 3]),
        torch.tensor([r2, 1, r2, 1, 1, r2, 1, r2, 3 * r2, 3, 3 * r2, 3, 3, 3 * r2, 3, 3 * r2]),
    )


# --------------------------------------------------------------------------- weights


def test_flat_image_weights_by_hand():
    flat = torch.full((1, 3, 6, 6), 0.5)
    # colour logits are −(0 / (0 + 1e-8) / w)² = 0: uniform softmax, 1/8 per neighbour at one dilation.
    # PAR's position kernel at d = 1: distances 1 (axes) and √2 (diagonals), mean (1 + √2)/2, unbiased
    # std √(8 · 0.2071² / 7) = 0.2214; logits −(1 / (0.2214 · 0.3))² = −226.7 against −453.4, so the
    # four axis neighbours take 1/4 each, the diagonals e^−227 ≈ 0.
    # PAR: axes 1/8 + 0.01/4 = 0.1275, diagonals 0.125.
    w = par_weights(flat, dilations=[1])[0, 0, :, 2, 2]
    axes = torch.tensor([1, 3, 4, 6])
    diagonals = torch.tensor([0, 2, 5, 7])
    torch.testing.assert_close(w[axes], torch.full((4,), 0.1275))
    torch.testing.assert_close(w[diagonals], torch.full((4,), 0.125))
    # VARM: no variation anywhere, so its softmax is uniform too: 1/8 − 0.01/8 = 0.12375 each
    torch.testing.assert_close(varm_weights(flat, dilations=[1])[0, 0, :, 2, 2], torch.full((8,), 0.12375))


@pytest.mark.parametrize(("weights", "total"), [(par_weights, 1.01), (varm_weights, 0.99)])
def test_weights_sum_to_one_plus_or_minus_the_second_weight(weights, total):
    image = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    w = weights(image)
    assert w.shape == (2, 1, 48, 20, 24)
    torch.testing.assert_close(w.sum(dim=2), torch.full((2, 1, 20, 24), total))


def test_local_variation_by_hand():
    # one channel, one neighbour map [[0, 1], [3, 5]]:
    # below: (0−3)² = 9, (1−5)² = 16, last row 0; right: (0−1)² = 1, (3−5)² = 4, last column 0
    n = torch.tensor([[0.0, 1.0], [3.0, 5.0]]).view(1, 1, 1, 2, 2)
    torch.testing.assert_close(local_variation(n)[0, 0, 0], torch.tensor([[10.0, 16.0], [4.0, 0.0]]))


def test_without_their_second_terms_par_and_varm_are_the_same_propagation():
    image, cam = _edge_scene()
    par = par_refine(image, cam, w_rgb=0.25, w_pos=0.0)
    torch.testing.assert_close(varm_refine(image, cam, w_var=0.0), par)


def test_varm_penalises_neighbours_in_textured_places():
    # left half flat, right half a checkerboard: a pixel on the flat side trusts its flat
    # neighbours more under VARM than under the same colour kernel alone
    image = torch.full((1, 3, 16, 16), 0.5)
    image[..., 8:] = (torch.arange(8)[None, :] + torch.arange(16)[:, None]).remainder(2).float().expand(3, 16, 8)
    with_var, without = varm_weights(image, dilations=[2]), varm_weights(image, dilations=[2], w_var=0.0)
    flat_side, textured_side = 3, 4  # neighbours (0, −2) and (0, +2) of pixel (8, 7) in RING order
    assert (with_var - without)[0, 0, textured_side, 8, 7] < (with_var - without)[0, 0, flat_side, 8, 7]


# --------------------------------------------------------------------------- refinement


@pytest.mark.parametrize("name", sorted(REFINERS))
def test_refinement_keeps_a_sharp_edge_that_the_seed_crosses(name):
    refine = REFINERS[name]
    image, cam = _edge_scene()
    refined = refine(image, cam, normalize=True)
    # seed: 0.46 mean activation on the 8 dark columns by the edge, 79% of its mass on the bright side
    assert _spill(cam) > 0.4 and _bright_share(cam) < 0.8
    # refined (measured): spill 0.15 (PAR) / 0.13 (VARM), 87% / 89% of the mass on the bright side
    assert _spill(refined) < 0.5 * _spill(cam)
    assert _bright_share(refined) > _bright_share(cam) + 0.05
    # without the edge the same propagation only spreads the CAM (control)
    flat = refine(torch.full_like(image, 0.5), cam, normalize=True)
    assert _spill(flat) > _spill(cam) and _bright_share(flat) < _bright_share(cam)


def test_par_converges_more_steps_change_less():
    # normalised PAR weights are non-negative and sum to 1, so each step is an averaging
    # operator and the largest change between successive steps can only shrink
    image, cam = _edge_scene()
    maps = [par_refine(image, cam, iters=n, normalize=True) for n in range(0, 21)]
    changes = [(b - a).abs().max().item() for a, b in itertools.pairwise(maps)]
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(changes))
    assert changes[-1] < 0.1 * changes[0]


def test_varm_converges_more_steps_change_less():
    image, cam = _edge_scene()
    maps = [varm_refine(image, cam, iters=n, normalize=True) for n in (0, 1, 10, 11, 30, 31)]
    first, tenth, thirtieth = ((maps[i + 1] - maps[i]).abs().max().item() for i in (0, 2, 4))
    assert thirtieth < tenth < 0.2 * first


@pytest.mark.parametrize(("name", "gain"), [("par", 1.01), ("varm", 0.99)])
def test_reference_maps_are_the_normalised_ones_times_a_uniform_gain(name, gain):
    refine = REFINERS[name]
    image, cam = _edge_scene()
    torch.testing.assert_close(refine(image, cam, iters=7), refine(image, cam, iters=7, normalize=True) * gain**7)


@pytest.mark.parametrize("name", sorted(REFINERS))
def test_shapes_dtype_and_inputs_kept(name):
    refine = REFINERS[name]
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 24, 20, generator=gen, dtype=torch.float64)
    cam = torch.rand(2, 3, 12, 10, generator=gen, dtype=torch.float64)  # half resolution: resized first
    image_before, cam_before = image.clone(), cam.clone()
    out = refine(image, cam, iters=3)
    assert out.shape == (2, 3, 24, 20) and out.dtype == torch.float64
    torch.testing.assert_close(image, image_before, rtol=0, atol=0)
    torch.testing.assert_close(cam, cam_before, rtol=0, atol=0)
    # channels are propagated independently with the image's weights
    up = F.interpolate(cam, size=(24, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out[:, 1:2], refine(image, up[:, 1:2], iters=3))
    # zero steps: the (resized) CAM itself
    torch.testing.assert_close(refine(image, cam, iters=0), up)


@pytest.mark.parametrize(("np_fn", "torch_fn"), [(par_refine_np, par_refine), (varm_refine_np, varm_refine)])
def test_numpy_and_torch_entry_points_agree(np_fn, torch_fn):
    image, cam = _edge_scene()
    image_u8 = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cam_np = cam[0, 0].numpy().copy()
    cam_before = cam_np.copy()
    out = np_fn(image_u8, cam_np, iters=5)
    assert out.shape == (S, S) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    np.testing.assert_array_equal(cam_np, cam_before)
    image_t = torch.from_numpy(image_u8).permute(2, 0, 1)[None].float() / 255
    expected = torch_fn(image_t, cam, iters=5, normalize=True).clamp(0, 1)[0, 0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"iters": -1}, "iters"), ({"iters": 2.5}, "iters"), ({"dilations": []}, "dilations"),
     ({"dilations": [1, 0]}, "dilations"), ({"w_rgb": 0.0}, "w_rgb")],
)
@pytest.mark.parametrize("name", sorted(REFINERS))
def test_bad_parameters_name_the_field(name, kwargs, field):
    image, cam = _edge_scene()
    with pytest.raises(ConfigError, match=field):
        REFINERS[name](image, cam, **kwargs)


def test_bad_second_weights_and_arrays_are_rejected():
    image, cam = _edge_scene()
    with pytest.raises(ConfigError, match="w_pos"):
        par_refine(image, cam, w_pos=-0.1)
    with pytest.raises(ConfigError, match="w_var"):
        varm_refine(image, cam, w_var=1.0)
    with pytest.raises(ValueError, match="batch"):
        par_refine(image, cam.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="uint8"):
        varm_refine_np(np.zeros((S, S, 3), np.float32), cam[0, 0].numpy())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        par_refine_np(np.zeros((S, S, 3), np.uint8), cam[0, 0].numpy() * 2)


def test_propagate_on_a_constant_map_with_normalised_weights_is_the_identity():
    w = torch.rand(1, 1, 16, 5, 5, generator=torch.Generator().manual_seed(4))
    const = torch.full((1, 2, 5, 5), 0.7)
    torch.testing.assert_close(propagate(const, w, [1, 2], iters=4, normalize=True), const)
