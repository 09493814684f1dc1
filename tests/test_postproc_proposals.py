import numpy as np
import pytest
import torch
from tiny_sam import tiny_sam

from postproc.masks import mask_iou
from postproc.proposals import (
    PROPOSAL_BACKENDS,
    SamProposals,
    SuperpixelProposals,
    build_proposals,
)
from training.errors import CheckpointError, ConfigError

OPEN_FILTERS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _two_region_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    square = (abs(yy - 30) < 12) & (abs(xx - 34) < 14)
    image = np.full((64, 64, 3), 30.0)
    image[square] = (200, 190, 180)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return image, square


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny_sam(seed=0).state_dict(), path)
    return path


def test_backends_are_registered_by_name():
    assert PROPOSAL_BACKENDS.names() == ["sam", "superpixel"]


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_superpixels_partition_the_image_and_find_the_object(method):
    image, square = _two_region_image()
    before = image.copy()
    masks = build_proposals("superpixel", method=method, n_segments=20).propose(image)
    assert len(masks) > 1
    assert all(mk.shape == (64, 64) and mk.dtype == bool for mk in masks)
    np.testing.assert_array_equal(np.sum(masks, axis=0), 1)  # every pixel in exactly one
    assert max(mask_iou(mk, square) for mk in masks) > 0.3
    np.testing.assert_array_equal(image, before)


def test_felzenszwalb_scale_controls_segment_size():
    image, square = _two_region_image()
    fine = SuperpixelProposals(scale=10, min_size=5).propose(image)
    coarse = SuperpixelProposals(scale=1000, min_size=50).propose(image)
    assert len(coarse) < len(fine)
    assert max(mask_iou(mk, square) for mk in coarse) > 0.8


def test_superpixel_rejects_bad_parameters():
    with pytest.raises(ConfigError, match="felzenszwalb, slic"):
        SuperpixelProposals(method="quickshift")
    with pytest.raises(ConfigError, match="n_segments"):
        SuperpixelProposals(n_segments=0)
    with pytest.raises(ValueError, match="uint8"):
        SuperpixelProposals().propose(np.zeros((8, 8, 3), np.float32))


def test_build_proposals_rejects_unknown_names_and_parameters():
    with pytest.raises(ConfigError, match="sam, superpixel"):
        build_proposals("sma")
    with pytest.raises(ConfigError, match=r"n_segment.*valid: method"):
        build_proposals("superpixel", n_segment=10)


def test_sam_loads_the_checkpoint_and_runs_the_real_mask_generator(tiny_checkpoint):
    # The builder makes a different random model; equal weights prove the file was loaded.
    backend = build_proposals(
        "sam",
        checkpoint=str(tiny_checkpoint),
        model_builder=lambda: tiny_sam(seed=1),
        device="cpu",
        **OPEN_FILTERS,
    )
    reference = tiny_sam(seed=0).state_dict()
    for name, tensor in backend.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], msg=name)
    image, _ = _two_region_image()
    masks = backend.propose(image)
    assert len(masks) >= 1
    assert all(mk.shape == (64, 64) and mk.dtype == bool for mk in masks)
    again = backend.propose(image)
    assert len(again) == len(masks)
    assert all(np.array_equal(a, b) for a, b in zip(masks, again, strict=True))


def test_sam_accepts_a_prebuilt_model():
    backend = SamProposals(model=tiny_sam(), device="auto", **OPEN_FILTERS)
    assert backend.device in {"cpu", "cuda"}
    assert backend.propose(_two_region_image()[0])


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64\.pth") as info:
        SamProposals(checkpoint=path, model_builder=tiny_sam, device="cpu")
    assert str(path) in str(info.value)


def test_wrong_architecture_is_a_checkpoint_error(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"not a .*SAM state dict") as info:
        SamProposals(checkpoint=tiny_checkpoint, model_builder=lambda: tiny_sam(embed_dim=16), device="cpu")
    assert str(tiny_checkpoint) in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"not a torch file", "could not be read"), (None, "expected a state dict")],
)
def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path, content, match):
    path = tmp_path / "broken.pth"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        SamProposals(checkpoint=path, model_builder=tiny_sam, device="cpu")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"model_type": "vit_s", "checkpoint": "x.pth"}, "vit_b, vit_h, vit_l"),
        ({}, "checkpoint"),
        ({"pred_iou_thresh": 1.5, "model_builder": tiny_sam}, "pred_iou_thresh"),
        ({"points_per_side": 0, "model_builder": tiny_sam}, "points_per_side"),
    ],
)
def test_sam_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        SamProposals(device="cpu", **params)
