import numpy as np
import pytest
import torch
from tiny_sam import tiny_sam

import postproc.pipeline as pipeline_module
from postproc.crf import crf_refine
from postproc.par import par_refine_np
from postproc.pipeline import STEPS, Pipeline, StepSpec
from postproc.proposals import SuperpixelProposals
from postproc.regions import refine_with_proposals
from postproc.threshold import seed_mask
from postproc.varm import varm_refine_np
from training.errors import ConfigError

CRF_THEN_REGIONS = [
    {"step": "crf", "scale": 12},
    {"step": "regions", "backend": "superpixel", "rule": "iou", "fusion": "copy"},
]


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    blob = (yy - 24) ** 2 + (xx - 22) ** 2 < 10**2
    image = np.full((48, 48, 3), 40.0)
    image[blob] = (220, 215, 210)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    cam = 0.9 * np.exp(-(((yy - 24) ** 2 + (xx - 22) ** 2) / 150)) + rng.normal(0, 0.1, blob.shape)
    return image, np.clip(cam, 0, 1).astype(np.float32)


def test_steps_are_registered_by_name():
    assert STEPS.names() == ["crf", "par", "regions", "threshold", "varm"]


def test_spec_round_trip_and_key():
    pipeline = Pipeline.from_spec(CRF_THEN_REGIONS)
    assert [s.name for s in pipeline.specs] == ["crf", "regions"]
    assert pipeline.specs[0] == StepSpec("crf", {"scale": 12})
    assert pipeline.to_spec() == CRF_THEN_REGIONS
    assert pipeline.key == "crf(recipe=thesis,scale=12)+regions(backend=superpixel,fusion=copy,rule=iou)"
    assert repr(pipeline) == f"Pipeline({pipeline.key})"


@pytest.mark.parametrize(
    "variant",
    [
        [{"scale": 12.0, "step": "crf"}, {"fusion": "copy", "rule": "iou", "step": "regions", "backend": "superpixel"}],
        [
            StepSpec("crf", {"scale": np.float64(12)}),
            StepSpec("regions", {"rule": "iou", "backend": "superpixel", "fusion": "copy"}),
        ],
    ],
)
def test_key_ignores_order_and_number_spelling(variant):
    assert Pipeline.from_spec(variant).key == Pipeline.from_spec(CRF_THEN_REGIONS).key


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ([], "seed"),
        ([{"step": "threshold", "threshold": 0.25}], "threshold(threshold=0.25)"),
        ([{"step": "crf"}], "crf(recipe=thesis)"),
        ([{"step": "crf", "iters": 5, "alpha": 1.5}], "crf(alpha=1.5,iters=5,recipe=thesis)"),
        (
            [{"step": "regions", "proposal_params": {"method": "slic", "n_segments": 50}}],
            "regions(superpixel.method=slic,superpixel.n_segments=50)",
        ),
    ],
)
def test_key_table(spec, key):
    assert Pipeline.from_spec(spec).key == key


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([{"step": "crff"}], r"pipeline\[0\]\.step: unknown refinement step 'crff'.*crf"),
        ([{"scale": 12}], "'step' key naming one of crf, par, regions, threshold, varm"),
        ({"step": "crf"}, "expected a list of steps"),
        ([{"step": "crf", "sacle": 12}], r"step 'crf' has no parameter\(s\) sacle; valid: recipe, scale, alpha"),
        ([{"step": "regions", "iou": 0.3}], "valid: backend, proposal_params, rule, fusion"),
        ([{"step": "crf", "iters": 0}], r"pipeline\[0\] \(crf\): iters"),
        ([{"step": "threshold", "threshold": 2}], "threshold: expected"),
        ([{"step": "regions", "rule": "vote"}], "valid: iou, majority"),
        ([{"step": "regions", "fusion": "xor"}], "valid: and, copy, or"),
        ([{"step": "regions", "backend": "sma"}], "valid: sam, superpixel"),
        ([{"step": "regions", "proposal_params": {"segments": 9}}], "segments; valid: method"),
        ([{"step": "regions", "proposal_params": 9}], "proposal_params: expected a mapping"),
        ([{"step": "regions"}, {"step": "crf"}], r"pipeline\[1\]: step 'crf' starts again"),
        ([{"step": "regions", "backend": "sam"}], "checkpoint"),
        ([{"step": "crf"}, {"step": "varm"}], r"pipeline\[1\]: step 'varm' starts again .* mask of 'crf'.*par, varm"),
        ([{"step": "varm"}, {"step": "regions"}, {"step": "par"}], r"pipeline\[2\]: step 'par' .* of 'regions'"),
        ([{"step": "varm", "w_var": 1.0}], r"pipeline\[0\] \(varm\): w_var"),
        ([{"step": "par", "dilations": [1, 0]}], r"pipeline\[0\] \(par\): dilations"),
        ([{"step": "varm", "iters": 2.5}], r"pipeline\[0\] \(varm\): iters"),
    ],
)
def test_invalid_specs_fail_with_the_culprit(spec, match):
    with pytest.raises(ConfigError, match=match):
        Pipeline.from_spec(spec)


def test_empty_and_regions_only_pipelines_start_from_the_thesis_seed():
    image, cam = _scene()
    np.testing.assert_array_equal(Pipeline.from_spec([])(image, cam), seed_mask(cam, threshold=0.3))
    proposals = SuperpixelProposals().propose(image)
    expected = refine_with_proposals(proposals, seed_mask(cam, threshold=0.3), rule="majority")
    got = Pipeline.from_spec([{"step": "regions", "rule": "majority"}])(image, cam)
    np.testing.assert_array_equal(got, expected)


def test_chained_crf_and_regions_equal_the_functions_composed():
    image, cam = _scene()
    before = (image.copy(), cam.copy())
    mask = Pipeline.from_spec(CRF_THEN_REGIONS)(image, cam)
    crf_mask = crf_refine(image, cam, scale=12)
    expected = refine_with_proposals(SuperpixelProposals().propose(image), crf_mask, rule="iou", fusion="copy")
    assert mask.dtype == bool and mask.shape == cam.shape
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(cam, before[1])


@pytest.mark.parametrize(("name", "refine"), [("varm", varm_refine_np), ("par", par_refine_np)])
def test_a_propagation_step_refines_the_cam_that_later_steps_read(name, refine):
    """``[varm]`` thresholds the VARM-refined CAM at the trial's threshold; ``[varm, crf]``
    runs the CRF on it; the input CAM is not modified."""
    image, cam = _scene()
    before = cam.copy()
    refined = refine(image, cam, iters=4)
    alone = Pipeline.from_spec([{"step": name, "iters": 4}])
    np.testing.assert_array_equal(alone(image, cam, seed_threshold=0.4), seed_mask(refined, threshold=0.4))
    then_crf = Pipeline.from_spec([{"step": name, "iters": 4}, {"step": "crf", "iters": 1}])
    np.testing.assert_array_equal(then_crf(image, cam), crf_refine(image, refined, iters=1, fg_threshold=0.3))
    twice = Pipeline.from_spec([{"step": name, "iters": 2}, {"step": name, "iters": 2}])
    np.testing.assert_array_equal(twice(image, cam), seed_mask(refine(image, refine(image, cam, iters=2), iters=2)))
    np.testing.assert_array_equal(cam, before)
    # the propagation changes the mask at all (a test that could not fail otherwise)
    assert (alone(image, cam, seed_threshold=0.4) != seed_mask(cam, threshold=0.4)).any()


def test_propagation_keys_name_lists_by_value():
    a = Pipeline.from_spec([{"step": "varm", "dilations": [1, 2, 4]}])
    b = Pipeline.from_spec([StepSpec("varm", {"dilations": (1, 2, 4)})])
    assert a.key == b.key == "varm(dilations=[1 2 4])"
    assert a.steps[0].dilations == (1, 2, 4)


def test_regions_steps_can_chain():
    image, cam = _scene()
    spec = [
        {"step": "threshold", "threshold": 0.4},
        {"step": "regions", "rule": "majority"},
        {"step": "regions", "fusion": "or"},
    ]
    first = refine_with_proposals(SuperpixelProposals().propose(image), seed_mask(cam, threshold=0.4), rule="majority")
    expected = refine_with_proposals(SuperpixelProposals().propose(image), first, fusion="or")
    np.testing.assert_array_equal(Pipeline.from_spec(spec)(image, cam), expected)


def test_backends_are_built_once_per_pipeline(monkeypatch):
    built = []
    real = pipeline_module.build_proposals

    def counting(name, **kwargs):
        built.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(pipeline_module, "build_proposals", counting)
    pipeline = Pipeline.from_spec(
        [
            {"step": "regions"},
            {"step": "regions", "fusion": "or"},
            {"step": "regions", "proposal_params": {"method": "slic"}},
        ]
    )
    image, cam = _scene()
    pipeline(image, cam)
    pipeline(image, cam)
    assert built == ["superpixel", "superpixel"]  # felzenszwalb once, slic once


def test_sam_regions_step_from_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam(seed=0).state_dict(), checkpoint)
    spec = [
        {"step": "crf", "scale": 16, "iters": 5},
        {
            "step": "regions",
            "backend": "sam",
            "rule": "iou",
            "fusion": "copy",
            "iou_threshold": 0.0,
            "proposal_params": {
                "checkpoint": str(checkpoint),
                "model_builder": tiny_sam,
                "device": "cpu",
                "points_per_side": 4,
                "pred_iou_thresh": 0.0,
                "stability_score_thresh": 0.0,
            },
        },
    ]
    pipeline = Pipeline.from_spec(spec)
    assert str(tmp_path) not in pipeline.key
    assert "sam.checkpoint=tiny_sam.pth" in pipeline.key
    assert "sam.model_builder=tiny_sam" in pipeline.key and "device" not in pipeline.key
    image, cam = _scene()
    mask = pipeline(np.ascontiguousarray(np.pad(image, ((8, 8), (8, 8), (0, 0)))), np.pad(cam, 8))
    assert mask.shape == (64, 64) and mask.dtype == bool


def test_pipeline_validates_arrays():
    pipeline = Pipeline.from_spec([{"step": "crf"}])
    with pytest.raises(ValueError, match="match the CAM"):
        pipeline(np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8), np.float32))
