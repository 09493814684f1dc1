"""The grid computes the thesis's method: every transfer pair, the CAM normalisation, the CRF
recipe and the oracle grid checked against `thesis_reference` (a transcription of the thesis's
code, sharing nothing with `training/`), first on hand-computed cases, then on random tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import thesis_reference as thesis
import torch

from training.cams import minmax_normalise
from training.config.names import THESIS_PAIRS, pair_origin, valid_pairs
from training.config.refine import CRF_RECIPES, CrfStep
from training.losses import transfer_loss
from training.metrics import DEFAULT_THRESHOLDS

# B=1, C=2, H=1, W=2. Student channels s0 = [1, 2], s1 = [3, 4]; teacher t0 = [2, 2], t1 = [0, 4].
S = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)
T = torch.tensor([[[[2.0, 2.0]], [[0.0, 4.0]]]], dtype=torch.float64)
_cos = lambda dot, a, b: dot / math.sqrt(a * b)  # dot product and squared norms

HAND = {
    # s = [1, 2, 3, 4], t = [2, 2, 0, 4]: s·t = 22, ‖s‖² = 30, ‖t‖² = 24
    ("cosine", "global"): 1 - _cos(22, 30, 24),
    # positions (1, 3)·(2, 0) = 2 over ‖·‖² 10 and 4; (2, 4)·(2, 4): cos 1
    ("cosine", "spatial"): 1 - (_cos(2, 10, 4) + 1) / 2,
    # all four channel pairs: s0·t0 = 6, s0·t1 = 8, s1·t0 = 14, s1·t1 = 16; ‖s0‖² 5, ‖s1‖² 25, ‖t0‖² 8, ‖t1‖² 16
    ("cosine", "channel"): 1 - (_cos(6, 5, 8) + _cos(8, 5, 16) + _cos(14, 25, 8) + _cos(16, 25, 16)) / 4,
    # channel means m_s = [2, 3], m_t = [1, 3]: m_s·m_t = 11, ‖m_s‖² 13, ‖m_t‖² 10
    ("cosine", "spatial_map"): 1 - _cos(11, 13, 10),
    ("l1", "spatial_map"): (1 + 0) / 2,
    ("l2", "spatial_map"): 1.0,  # ‖[1, 0]‖
    # G_s = [[5, 11], [11, 25]], G_t = [[8, 8], [8, 16]]; column 0: 128 over 146 and 128; column 1: 488 over 746, 320
    ("cosine", "gram"): 1 - (_cos(128, 146, 128) + _cos(488, 746, 320)) / 2,
    ("l1", "global"): (1 + 0 + 3 + 0) / 4,  # |s − t| = [1, 0, 3, 0]
    ("l2", "global"): math.sqrt(10),  # ‖[−1, 0, 3, 0]‖, a norm: not 10, not 10/4
}


@pytest.mark.parametrize(("metric", "level"), sorted(HAND), ids=lambda p: str(p))
def test_hand_computed_thesis_pairs(metric: str, level: str) -> None:
    ours = transfer_loss(S, T, metric=metric, level=level).item()
    assert ours == pytest.approx(HAND[(metric, level)], abs=1e-12)
    assert thesis.FEATURE_PAIRS[(metric, level)](S, T).item() == pytest.approx(HAND[(metric, level)], abs=1e-12)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_hand_computed_logit_pairs(metric: str) -> None:
    zs, zt = torch.tensor([[0.5], [-1.0]]), torch.tensor([[1.5], [1.0]])
    # differences 1 and 2: l1 = mean = 1.5; l2 = mean of per-sample norms = (1 + 2) / 2
    assert transfer_loss(zs, zt, metric=metric, level="logits").item() == pytest.approx(1.5)
    assert thesis.logits(zs, zt, metric).item() == pytest.approx(1.5)


def test_every_feature_pair_of_the_thesis_is_covered() -> None:
    feature_pairs = {pair for pair in THESIS_PAIRS if pair[1] != "logits"}
    assert feature_pairs == set(thesis.FEATURE_PAIRS) == set(HAND)
    assert all(pair in valid_pairs() for pair in THESIS_PAIRS)
    assert pair_origin("kl", "global") == "ours" and pair_origin("cosine", "channel_matched") == "ours"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("metric", "level"), sorted(thesis.FEATURE_PAIRS))
def test_random_maps_match_the_thesis_in_value_and_gradient(metric: str, level: str, seed: int) -> None:
    """Random shapes and values: the loss and its gradient w.r.t. both maps agree."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = (int(x) for x in torch.randint(1, 5, (4,), generator=gen))
    s = torch.randn(b, c + 1, h, w, generator=gen, dtype=torch.float64).requires_grad_()
    t = torch.randn(b, c + 1, h, w, generator=gen, dtype=torch.float64).requires_grad_()
    ours = transfer_loss(s, t, metric=metric, level=level)
    grads = torch.autograd.grad(ours, (s, t))
    reference = thesis.FEATURE_PAIRS[(metric, level)](s, t)
    expected = torch.autograd.grad(reference, (s, t))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-10, abs=1e-12)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_random_logits_match_the_thesis(metric: str) -> None:
    gen = torch.Generator().manual_seed(11)
    zs, zt = torch.randn(7, 1, generator=gen), torch.randn(7, 1, generator=gen)
    assert transfer_loss(zs, zt, metric=metric, level="logits").item() == pytest.approx(
        thesis.logits(zs, zt, metric).item(), rel=1e-6
    )


def test_l2_is_a_norm_so_its_gradient_does_not_vanish_near_the_target() -> None:
    """MSE's gradient shrinks with the distance; the thesis's norm keeps unit length."""
    for gap in (1.0, 0.01):
        s = (torch.zeros(1, 2, 4, 4) + gap).requires_grad_()
        transfer_loss(s, torch.zeros(1, 2, 4, 4), metric="l2", level="global").backward()
        assert s.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_minmax_normalisation_is_the_thesis_one() -> None:
    gen = torch.Generator().manual_seed(3)
    cam = torch.rand(3, 5, 6, generator=gen) + 0.4  # no zero anywhere: where min–max differs from x/max
    assert torch.allclose(minmax_normalise(torch.relu(cam)), thesis.minmax_cam(cam), atol=1e-7)
    assert minmax_normalise(cam).amin().item() == pytest.approx(0.0, abs=1e-7)


def test_the_thesis_crf_recipe_and_decision() -> None:
    recipe = CRF_RECIPES.get("thesis")
    ref = thesis.CRF_THESIS
    assert (recipe.alpha, recipe.iters, recipe.decision) == (ref["alpha"], ref["iters"], "threshold")
    assert (recipe.gauss_sxy, recipe.gauss_compat) == (ref["gauss_sxy"], ref["gauss_compat"])
    assert (recipe.bilateral_sxy, recipe.bilateral_srgb, recipe.bilateral_compat) == (
        ref["bilateral_sxy"], ref["bilateral_srgb"], ref["bilateral_compat"],
    )  # fmt: skip
    assert CrfStep().recipe == "thesis" and CrfStep().resolved()["decision"] == "threshold"
    assert CrfStep(recipe="psa").resolved()["decision"] == "argmax"


def test_the_oracle_searches_the_thesis_grid() -> None:
    assert len(DEFAULT_THRESHOLDS) == thesis.ORACLE_STEPS
    assert np.allclose(DEFAULT_THRESHOLDS, np.linspace(0, 1, thesis.ORACLE_STEPS))
