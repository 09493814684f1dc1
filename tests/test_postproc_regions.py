"""Hand-computed cases on 2×5 masks (10 pixels), written as rows joined by '/'."""

import numpy as np
import pytest

from postproc.regions import (
    FUSION_MODES,
    SELECTION_RULES,
    fuse,
    refine_with_proposals,
    select_regions,
)
from training.errors import ConfigError


def m(text: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in text.split("/")])


SEED = m("11100/11100")  # 6 px
A = m("11000/11000")  # 4 px: IoU 4/6 = .667, all inside the seed
B = m("00110/00110")  # 4 px: IoU 2/8 = .25, half inside, covers 2/6 of the seed
C = m("00001/00001")  # 2 px: disjoint from the seed
BIG = m("11111/11100")  # 8 px = 0.8 of the image: IoU 6/8 = .75
NONE = m("00000/00000")


@pytest.mark.parametrize(
    ("masks", "seed", "params", "expected"),
    [
        # rule iou
        ([A, B, C], SEED, {"iou_threshold": 0.35}, A),
        ([A, B, C], SEED, {"iou_threshold": 0.25}, A | B),  # ≥ is inclusive
        ([A, B, C], SEED, {"iou_threshold": 0.7}, NONE),
        ([BIG], SEED, {"iou_threshold": 0.35}, NONE),  # 0.8 > max_area 0.5: dropped
        ([BIG], SEED, {"iou_threshold": 0.35, "max_area": 0.8}, BIG),  # at max_area: kept
        ([A], NONE, {"iou_threshold": 0.0}, A),  # IoU 0 ≥ 0
        ([], SEED, {}, NONE),
        # rule majority: inside > inside_fraction, or covers ≥ coverage of the seed
        ([A, B, C], SEED, {"rule": "majority"}, A),  # B is exactly half inside: not kept
        ([A, B, C], SEED, {"rule": "majority", "inside_fraction": 0.4}, A | B),
        ([A], m("01000/00000"), {"rule": "majority", "inside_fraction": 0.9}, A),  # covers 1/1
        ([A], m("01000/00000"), {"rule": "majority", "inside_fraction": 0.9, "coverage": 1.0}, A),
        (
            [A, B],
            m("00100/00100"),
            {"rule": "majority", "inside_fraction": 0.9, "coverage": 0.85},
            B,
        ),  # B covers the whole seed
        (
            [A, B],
            m("00100/00100"),
            {"rule": "majority", "inside_fraction": 0.9, "coverage": 0.85, "max_area": 0.3},
            NONE,
        ),
        ([C], NONE, {"rule": "majority"}, NONE),  # empty seed: nothing inside, no coverage
    ],
)
def test_select_regions_table(masks, seed, params, expected):
    regions = select_regions(masks, seed, **params)
    assert regions.dtype == bool and regions.shape == seed.shape
    np.testing.assert_array_equal(regions, expected)


def test_iou_and_majority_disagree_on_a_small_seed():
    seed = m("01000/00000")
    # A: IoU 1/4 → not kept by iou; covers the whole seed → kept by majority
    assert not select_regions([A], seed, rule="iou").any()
    np.testing.assert_array_equal(select_regions([A], seed, rule="majority"), A)


R = m("01110/00000")


@pytest.mark.parametrize(
    ("mode", "regions", "uncovered", "expected"),
    [
        ("and", R, None, m("01100/00000")),
        ("or", R, None, m("11110/11100")),
        ("copy", R, None, R),  # some region kept: the regions alone
        ("copy", NONE, None, SEED),  # nothing kept: the seed
        ("copy", R, m("00011/00011"), R),  # seed lies only on covered pixels
        ("copy", R, m("10000/10000"), m("11110/10000")),  # seed kept where uncovered
        ("copy", NONE, NONE, NONE),  # all pixels covered, none kept
        ("and", R, m("10000/10000"), m("01100/00000")),  # uncovered ignored
        ("or", NONE, NONE, SEED),
    ],
)
def test_fuse_table(mode, regions, uncovered, expected):
    fused = fuse(SEED, regions, mode=mode, uncovered=uncovered)
    assert fused.dtype == bool
    np.testing.assert_array_equal(fused, expected)


@pytest.mark.parametrize(
    ("masks", "rule", "fusion", "expected"),
    [
        # iou: A kept → copy gives A; B alone is not kept → the whole seed
        ([A, B], "iou", "copy", A),
        ([B], "iou", "copy", SEED),
        ([A, B], "iou", "or", SEED),
        ([A, B], "iou", "and", A),
        # majority: B rejected, so seed pixels under B become background; seed
        # pixels under no proposal (column 2 when only A is given) stay
        ([A, B], "majority", "copy", A),
        ([A], "majority", "copy", SEED),
        ([A, C], "majority", "copy", SEED),
        ([BIG], "majority", "copy", SEED),  # BIG is dropped, so it covers nothing
        ([B, C], "majority", "copy", m("11000/11000")),
        ([B, C], "majority", "or", SEED),
        ([B, C], "majority", "and", NONE),
    ],
)
def test_refine_with_proposals_table(masks, rule, fusion, expected):
    refined = refine_with_proposals(masks, SEED, rule=rule, fusion=fusion)
    np.testing.assert_array_equal(refined, expected)


@pytest.mark.parametrize("rule", SELECTION_RULES.names())
@pytest.mark.parametrize("fusion", FUSION_MODES.names())
def test_every_rule_and_fusion_keeps_shape_and_inputs(rule, fusion):
    rng = np.random.default_rng(0)
    seed = rng.random((6, 7)) > 0.5
    masks = [rng.random((6, 7)) > 0.7 for _ in range(5)]
    before = [x.copy() for x in [seed, *masks]]
    refined = refine_with_proposals(masks, seed, rule=rule, fusion=fusion)
    assert refined.shape == seed.shape and refined.dtype == bool
    assert not np.shares_memory(refined, seed)
    for original, now in zip(before, [seed, *masks], strict=True):
        np.testing.assert_array_equal(original, now)


def test_integer_masks_are_accepted():
    refined = refine_with_proposals([A.astype(np.uint8)], SEED.astype(np.int64), rule="iou")
    np.testing.assert_array_equal(refined, A)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: select_regions([A], SEED, rule="mode"), ConfigError, "iou, majority"),
        (lambda: fuse(SEED, A, mode="xor"), ConfigError, "and, copy, or"),
        (lambda: refine_with_proposals([A], SEED, fusion="union"), ConfigError, "fusion"),
        (lambda: select_regions([A], SEED, iou_threshold=1.5), ConfigError, "iou_threshold"),
        (lambda: select_regions([A], SEED, max_area=-0.1), ConfigError, "max_area"),
        (lambda: select_regions([m("1/1")], SEED), ValueError, r"masks\[0\]"),
        (lambda: fuse(SEED, m("1/1")), ValueError, "regions"),
        (lambda: select_regions([A * 2], SEED), ValueError, "0/1"),
    ],
)
def test_errors_name_the_culprit(call, error, match):
    with pytest.raises(error, match=match):
        call()
