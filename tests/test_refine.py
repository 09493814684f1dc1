"""Refinement fan-out: grid expansion, trial selection, Ray actors vs the plain loop, reruns and failures.

Two fake trial folders (CAMs = blurred ground truth + seeded noise, 3 shards of
8 images each at 64 px) are refined with a 1-iteration CRF and superpixel
regions, plus the seed pipeline. One Ray session serves the tests that fan out to
actors; those start Ray and are marked slow, the others use the plain loop's results.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from orchestrator import refine_actors
from orchestrator.refine import (
    RefineFailed,
    expand_refine_grid,
    log_refinement,
    make_units,
    metric_key,
    pipeline_key,
    read_masks,
    refine_reference,
    refine_units,
    select_trials,
    summarise,
)
from postproc.pipeline import Pipeline
from training.config import DataConfig, TrialConfig, load_trial_config, save_config
from training.data import read_mask, scan_test
from training.errors import ConfigError
from training.shards import write_shards
from training.synth import SynthConfig, generate

SYNTH = SynthConfig(size=64, n_train=8, n_test=24, seed=1)
CRF = [{"step": "crf", "iters": 1}]
SUPERPIXEL = [{"step": "regions", "backend": "superpixel", "fusion": "or"}]
SPECS = [CRF, SUPERPIXEL]


# ---------------------------------------------------------------- grid and selection

EXAMPLE = {
    "trials": "best:2",
    "pipelines": [
        [{"step": "crf", "scale": {"grid": [2, 12, 16]}}],
        [{"step": "crf", "scale": 12},
         {"step": "regions", "backend": "superpixel", "fusion": {"grid": ["and", "or", "copy"]}}],
    ],
}


@pytest.mark.parametrize(
    ("pipelines", "count"),
    [
        (EXAMPLE["pipelines"], 6),
        ([[{"step": "crf", "scale": {"grid": [2, 12]}, "iters": {"grid": [1, 5, 10]}}]], 6),
        ([[{"step": "regions", "proposal_params": {"scale": {"grid": [50, 100]}}}]], 2),
        ([[{"step": "crf"}], [{"step": "crf"}], []], 2),  # duplicates dropped; [] is the seed
        ([[{"step": "regions", "backend": "sam", "proposal_params": {"checkpoint": "x.pth"}}]], 1),  # not loaded
    ],
)
def test_expand_refine_grid_counts(pipelines, count):
    specs = expand_refine_grid({"pipelines": pipelines})
    assert len(specs) == count
    assert len({pipeline_key(s) for s in specs}) == count
    assert all("grid" not in repr(s) for s in specs)


def test_expand_refine_grid_example_keys():
    keys = [pipeline_key(s) for s in expand_refine_grid(EXAMPLE)]
    assert keys[:3] == ["crf(recipe=thesis,scale=2)", "crf(recipe=thesis,scale=12)", "crf(recipe=thesis,scale=16)"]
    assert keys[5] == "crf(recipe=thesis,scale=12)+regions(backend=superpixel,fusion=copy)"
    assert pipeline_key(CRF) == Pipeline.from_spec(CRF).key and pipeline_key([]) == "seed"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"pipelines": [[{"step": "crf"}], [{"step": "regions", "fusion": {"grid": ["or", "andd"]}}]]},
         ["refine.pipelines[1]", "fusion='andd'", "regions", "andd"]),
        ({"pipelines": [[{"step": "crf", "scale": {"grid": [12, -1]}}]]}, ["refine.pipelines[0]", "scale", "-1"]),
        ({"pipelines": [[{"step": "crff"}]]}, ["refine.pipelines[0]", "crff"]),
        ({"pipelines": [[{"step": "regions"}, {"step": "crf"}]]}, ["pipeline[1]", "crf", "first step"]),
        ({"pipelines": [[{"step": "crf", "scale": {"grid": []}}]]}, ["refine.pipelines[0][0].scale", "grid"]),
        ({"pipelines": [{"step": "crf"}]}, ["refine.pipelines[0]", "list of steps"]),
        ({"pipelines": [[{"step": "regions", "backend": "sam", "proposal_params": {"pts": 3}}]]}, ["sam", "pts"]),
        ({"pipelines": []}, ["refine.pipelines", "non-empty"]),
        ({"pipelines": [[]], "trails": "all"}, ["trails", "valid"]),
    ],
)
def test_expand_refine_grid_errors(section, expected):
    with pytest.raises(ConfigError) as info:
        expand_refine_grid(section)
    for part in expected:
        assert part in str(info.value)


ROWS = [{"trial_id": "a", "miou": 0.2}, {"trial_id": "b", "miou": 0.5}, {"trial_id": "c", "miou": float("nan")},
        {"trial_id": "d", "miou": 0.4}]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("best:2", ["b", "d"]), ("best:9", ["b", "d", "a"]), ("all", ["a", "b", "c", "d"]), ("c, a", ["c", "a"]),
     (["d"], ["d"])],
)
def test_select_trials(spec, expected):
    assert select_trials(ROWS, spec) == expected


@pytest.mark.parametrize(("spec", "match"), [("best:0", "best:K"), ("best:x", "best:K"), ("a,zz", "zz.*known: a, b")])
def test_select_trials_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        select_trials(ROWS, spec)


def test_metric_key_uses_mlflow_characters():
    key = metric_key("crf(recipe=thesis,scale=12)+regions(backend=superpixel,fusion=copy)")
    assert key == "crf_recipe_thesis_scale_12_regions_backend_superpixel_fusion_copy"
    assert metric_key("x" * 300) != metric_key("x" * 301) and len(metric_key("x" * 300)) <= 200


def test_cpu_actors_see_no_gpu():
    cpu, gpu = refine_actors.actor_options("cpu"), refine_actors.actor_options("gpu")
    assert cpu["num_gpus"] == 0 and cpu["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    assert gpu["num_gpus"] == 1


# ---------------------------------------------------------------- fake trials


def _write_trial(trial: Path, data: Path, seed: int) -> None:
    trial.mkdir(parents=True)
    save_config(TrialConfig(name=trial.name, data=DataConfig(root=str(data), synth=SYNTH, image_size=64)),
                trial / "config.yaml")
    rng = np.random.default_rng(seed)
    items = scan_test(data)
    cams = []
    for item in items:
        gt = read_mask(item.mask, shape=(SYNTH.size, SYNTH.size)).astype(np.float32)
        cam = cv2.GaussianBlur(gt, (0, 0), 4) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.15, gt.shape)
        cams.append(np.clip(cam, 0, 1).astype(np.float32))
    labels = np.array([int(c.max() > 0.5) for c in cams])
    write_shards(trial / "cams", [i.id for i in items], cams, labels - 0.5, labels, shard_size=8)


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refine")
    data = generate(SYNTH, root / "data")
    out = {}
    for seed, name in enumerate(("trial-a", "trial-b")):
        _write_trial(root / "trials" / name, data, seed)
        out[name] = root / "trials" / name
    return out


def _copy_trials(trials: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Fresh copies (config + CAMs, no refine outputs) with the same trial ids."""
    skip = shutil.ignore_patterns("refine")
    return {tid: Path(shutil.copytree(d, folder / tid, ignore=skip)) for tid, d in trials.items()}


def _table(rows) -> dict:
    return {(r["trial_id"], r["pipeline"]): {k: v for k, v in r.items() if k != "trial_dir"} for r in rows}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(trials, tmp_path_factory):
    """The plain loop's results on copies of the trials."""
    units = make_units(_copy_trials(trials, tmp_path_factory.mktemp("reference")), SPECS)
    return refine_reference(units)


@pytest.fixture(scope="module")
def fanned(trials, ray_session):
    """The Ray fan-out's results on the trials themselves (2 CPU actors)."""
    units = make_units(trials, SPECS)
    return units, refine_units(units, cpu_actors=2, progress=False)


# ---------------------------------------------------------------- fan-out


@pytest.mark.slow
def test_fanout_equals_reference(reference, fanned):
    units, results = fanned
    assert len(units) == 2 * 3 * 3 and all(r.status == "done" for r in results)
    assert _table(summarise(results)) == _table(summarise(reference))
    rows = summarise(results)
    assert {r["pipeline"] for r in rows} == {"seed", pipeline_key(CRF), pipeline_key(SUPERPIXEL)}
    assert all(r["images"] == 24 and 0 < r["miou_refined"] <= 1 for r in rows)
    for mine, theirs in zip(results, reference, strict=True):
        assert mine.counter == theirs.counter
        assert read_masks(mine.unit.masks_path).keys() == read_masks(theirs.unit.masks_path).keys()
        for image_id, mask in read_masks(mine.unit.masks_path).items():
            np.testing.assert_array_equal(mask, read_masks(theirs.unit.masks_path)[image_id])


@pytest.mark.slow
def test_rerun_skips_finished_units(fanned):
    units, first = fanned
    stamps = {u.counts_path: u.counts_path.stat().st_mtime_ns for u in units}
    again = refine_units(units, cpu_actors=2, progress=False)
    assert {r.status for r in again} == {"skipped"} and all(r.attempts == 0 for r in again)
    assert {u.counts_path: u.counts_path.stat().st_mtime_ns for u in units} == stamps
    assert _table(summarise(again)) == _table(summarise(first))


def test_stale_counts_file_is_redone(reference, tmp_path):
    units = [r.unit for r in reference]  # the plain loop's: no Ray needed here
    unit = next(u for u in units if u.key == "seed")
    copy = make_units(_copy_trials({unit.trial_id: unit.trial_dir}, tmp_path), [])
    refine_reference(copy)
    copy[0].counts_path.write_text("{not json")
    results = refine_reference(copy)
    assert [r.status for r in results] == ["done", "skipped", "skipped"]
    assert results[0].counter == next(r for r in refine_reference(units) if r.unit.shard == unit.shard).counter


def test_seed_and_crf_decision_follow_the_trials_cam_threshold(trials, tmp_path):
    """A trial scored at cam.threshold 0.5 is refined from the 0.5 seed, not a fixed 0.3."""
    copies = _copy_trials({"trial-a": trials["trial-a"]}, tmp_path)
    config = copies["trial-a"] / "config.yaml"
    save_config(load_trial_config(config).replace(**{"cam.threshold": 0.5}), config)
    units = make_units(copies, [CRF])
    assert {u.seed_threshold for u in units} == {0.5}
    seed = [u for u in units if u.key == "seed"]
    at_05 = refine_reference(seed)
    at_03 = refine_reference(make_units({"trial-a": trials["trial-a"]}, [], include_seed=True))
    assert sum(r.counter.to_dict()["union"] for r in at_05) != sum(r.counter.to_dict()["union"] for r in at_03)


@pytest.mark.slow
def test_truncated_shard_fails_by_name(trials, ray_session, tmp_path):
    copies = _copy_trials(trials, tmp_path)
    shard = copies["trial-b"] / "cams" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    units = make_units(copies, [CRF])
    with pytest.raises(RefineFailed, match=r"trial-b/shard-00001\.npz") as info:
        refine_units(units, cpu_actors=1, progress=False)
    failed = [r for r in info.value.results if r.status == "failed"]
    assert {(r.unit.trial_id, r.unit.shard.name) for r in failed} == {("trial-b", "shard-00001.npz")}
    assert all("truncated" in r.error and r.counter is None for r in failed)
    assert not any(r.unit.counts_path.exists() for r in failed)
    assert all(r.unit.counts_path.exists() for r in info.value.results if r.status == "done")
    rows = summarise(info.value.results)
    assert {r["trial_id"] for r in rows} == {"trial-a"}  # trial-b's tables would lack a shard
    partial = summarise(info.value.results, allow_partial=True)
    assert {r["images"] for r in partial if r["trial_id"] == "trial-b"} == {16}


@pytest.mark.slow
def test_killed_actor_costs_only_its_unit(trials, reference, ray_session, tmp_path, monkeypatch):
    receive = refine_actors._Dispatcher._receive
    killed = []

    def receive_then_kill(self, slot, index, ref):
        receive(self, slot, index, ref)
        busy = [s for s in self.slots if s.busy]
        if not killed and busy:  # kill an actor while it has a unit in flight
            ray_session.kill(busy[0].actor, no_restart=True)
            killed.append(index)

    monkeypatch.setattr(refine_actors._Dispatcher, "_receive", receive_then_kill)
    units = make_units(_copy_trials(trials, tmp_path), SPECS)
    results = refine_units(units, cpu_actors=2, progress=False)
    assert killed and max(r.attempts for r in results) == 2
    assert all(r.status == "done" for r in results)
    assert _table(summarise(results)) == _table(summarise(reference))


def test_sam_units_need_gpu_actors(trials, tmp_path):
    sam = [{"step": "regions", "backend": "sam", "proposal_params": {"checkpoint": "x.pth"}}]
    units = make_units(_copy_trials(trials, tmp_path), [sam], include_seed=False)
    assert all(u.needs_gpu for u in units)
    with pytest.raises(ConfigError, match=r"gpu_actors.*sam"):
        refine_units(units, cpu_actors=2, gpu_actors=0, progress=False)


# ---------------------------------------------------------------- MLflow


def test_log_refinement(reference, uri):
    from orchestrator.tracking import SweepTracking

    tracking = SweepTracking.open(uri, "refine-test", "sweep", space={"refine": EXAMPLE})
    run_a = tracking.child_run("trial-a", run_name="a", params={})
    rows = summarise(reference)  # the same rows as the fan-out's (test_fanout_equals_reference)
    texts = log_refinement(tracking, rows, {"trial-a": run_a}, overlay_images=2)
    assert "| pipeline | trial-a | trial-b |" in texts["refine_miou_refined"]
    metrics = tracking.client.get_run(run_a).data.metrics
    crf = next(r for r in rows if r["trial_id"] == "trial-a" and r["pipeline"] == pipeline_key(CRF))
    assert metrics[f"refine/{metric_key(pipeline_key(CRF))}/miou"] == pytest.approx(crf["miou_refined"])
    logged = {f.path for f in tracking.client.list_artifacts(tracking.parent_run_id, "refine/overlays/trial-a")}
    assert f"refine/overlays/trial-a/{metric_key(pipeline_key(CRF))}.png" in logged
