"""The config schema: a leaf (no torch), its name tables agree with the registries,
each default written once, cross-field rules decided from the tables' facts."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.config import TrialConfig, from_dict, names
from training.config.refine import (
    BACKENDS,
    STEPS,
    CrfStep,
    ParStep,
    RegionsStep,
    SamParams,
    SuperpixelParams,
    ThresholdStep,
    VarmStep,
    pipeline_key,
    pipeline_uses_gpu,
)
from training.config.sweep import RefineSection
from training.errors import ConfigError

ROOT = Path(__file__).parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
HEAVY = ("torch", "timm", "ray", "mlflow", "cv2", "skimage", "pydensecrf", "segment_anything", "matplotlib")


def test_validate_imports_no_heavy_package() -> None:
    """`wsss validate` of every shipped space, in one fresh interpreter, never imports torch & co."""
    script = textwrap.dedent(f"""
        import sys
        import training.config.sweep, training.config.refine, orchestrator.commands
        from orchestrator.cli import main
        for path in {[str(p) for p in SPACES]!r}:
            assert main(["validate", path]) == 0, path
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _import_graph() -> dict[str, set[str]]:
    """Project module → project modules it imports anywhere in its body (function-level imports too)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("training", "postproc", "orchestrator") for p in (ROOT / pkg).rglob("*.py")}  # fmt: skip
    graph = {}
    for module, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                named = {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
                deps |= {n if n in files else node.module for n in named}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[module] = {d for d in deps if d in files and d != module}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_circle_and_the_schema_is_a_leaf() -> None:
    graph = _import_graph()
    circles = sorted(m for m in graph if m in _reachable(graph, m))
    assert circles == []
    # training.atomic is itself a stdlib-only leaf (torch only inside write_torch, imported there):
    # save_config writes the resolved config atomically like every other file a trial leaves.
    leaf = {"training.errors", "training.registry", "training.atomic"}
    assert _reachable(graph, "training.atomic") <= {"training.errors"}
    for module in (m for m in graph if m.startswith("training.config")):
        outside = {d for d in _reachable(graph, module) if not d.startswith("training.config")}
        assert outside <= leaf, f"{module} imports {sorted(outside - leaf)}"


def _pairs():
    """(name table, implementation registry) for every registry that implements a table."""
    from orchestrator.space import SAMPLERS
    from orchestrator.tuner import SCHEDULERS
    from postproc.pipeline import STEP_BUILDERS
    from postproc.proposals import PROPOSAL_BACKENDS
    from postproc.regions import FUSION_MODES, SELECTION_RULES
    from training.cams import CAM_METHODS
    from training.losses import LEVELS, METRICS
    from training.paradigms import PARADIGMS

    return [
        (names.PARADIGMS, PARADIGMS), (names.TRANSFER_METRICS, METRICS), (names.ALIGNMENT_LEVELS, LEVELS),
        (names.CAM_METHODS, CAM_METHODS), (names.SELECTION_RULES, SELECTION_RULES),
        (names.FUSION_MODES, FUSION_MODES), (STEPS, STEP_BUILDERS), (BACKENDS, PROPOSAL_BACKENDS),
        (names.SAMPLERS, SAMPLERS), (names.SCHEDULERS, SCHEDULERS),
    ]  # fmt: skip


def test_every_table_name_has_an_implementation_and_back() -> None:
    for table, registry in _pairs():
        assert registry.table is table, registry.kind
        assert registry.names() == table.names(), registry.kind


def test_an_untabled_implementation_cannot_be_registered() -> None:
    from training.losses import METRICS

    with pytest.raises(ValueError, match="'cosin' is not in its name table"):
        METRICS.register("cosin")(lambda s, t, temperature: s)


def test_sam_model_types_are_segment_anythings() -> None:
    from segment_anything import sam_model_registry

    assert names.SAM_MODEL_TYPES.names() == sorted(sam_model_registry)


def test_every_superpixel_method_runs() -> None:
    import numpy as np

    from postproc.proposals import SuperpixelProposals

    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = 200
    for method in names.SUPERPIXEL_METHODS:
        masks = SuperpixelProposals(method=method).propose(image)
        assert masks and all(m.shape == (16, 16) for m in masks)


# ---------------------------------------------------------------- ViT families


def test_vit_families_cover_timms_vit_modules_and_nothing_else() -> None:
    import timm

    vit_modules = ("vision_transformer", "deit")
    for module in vit_modules:
        missed = [n for n in timm.list_models(module=module) if not names.is_vit(n)]
        assert not missed, f"{module}: {missed[:5]}"
    # the prefixes also catch ViT variants kept in other modules, but never a CNN's
    allowed = {*vit_modules, "eva", "beit", "vision_transformer_hybrid", "vision_transformer_relpos"}
    caught = {m: [n for n in timm.list_models(module=m) if names.is_vit(n)] for m in timm.list_modules()}
    assert {m for m, found in caught.items() if found} <= allowed


@pytest.mark.parametrize(
    ("name", "vit"),
    [("vit_tiny_patch16_224", True), ("deit_tiny_patch16_224", True), ("deit3_small_patch16_224", True),
     ("test_vit", True), ("resnet10t", False)],
)  # fmt: skip
def test_is_vit_agrees_with_the_network_built(name: str, vit: bool) -> None:
    """The table's answer is the network's structure (patch embedding + token blocks)."""
    from training.config import NetConfig
    from training.models import build_net

    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2} if vit else {}
    net = build_net(NetConfig(name, options=tiny), image_size=32)
    assert NetConfig(name).is_vit is net.is_vit is vit
    assert (hasattr(net.net, "patch_embed") and hasattr(net.net, "blocks")) is vit


# ---------------------------------------------------------------- defaults written once


def _keyword_defaults(function) -> dict:
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _field_defaults(cls, skip=()) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def test_pure_functions_take_their_defaults_from_the_step_dataclasses() -> None:
    from postproc.crf import crf_refine
    from postproc.par import par_refine_np
    from postproc.proposals import SamProposals, SuperpixelProposals
    from postproc.regions import refine_with_proposals, select_regions
    from postproc.threshold import seed_mask
    from postproc.varm import varm_refine_np

    assert _keyword_defaults(crf_refine) == _field_defaults(CrfStep)
    assert _keyword_defaults(seed_mask) == _field_defaults(ThresholdStep)
    assert _keyword_defaults(refine_with_proposals) == _field_defaults(RegionsStep, ("backend", "proposal_params"))
    assert _keyword_defaults(select_regions) == _field_defaults(RegionsStep, ("backend", "proposal_params", "fusion"))
    assert _keyword_defaults(SuperpixelProposals.__init__) == _field_defaults(SuperpixelParams)
    assert _keyword_defaults(SamProposals.__init__) == _field_defaults(SamParams)
    assert _keyword_defaults(varm_refine_np) == _field_defaults(VarmStep)
    assert _keyword_defaults(par_refine_np) == _field_defaults(ParStep)


def test_scd_functions_take_their_defaults_from_the_scd_section() -> None:
    from training.config.scd import SCDConfig
    from training.scd import SegmentationHead, correspondence_loss, energy_loss, pseudo_labels

    scd = SCDConfig()
    labels = _keyword_defaults(pseudo_labels)
    assert (labels["high"], labels["low"], labels["down_scale"]) == (scd.bg_high, scd.bg_low, scd.label_down_scale)
    assert _keyword_defaults(correspondence_loss)["points"] == scd.points
    head = _keyword_defaults(SegmentationHead.__init__)
    assert (head["width"], head["dropout"]) == (scd.head_width, scd.head_dropout)
    energy = _keyword_defaults(energy_loss)
    assert (energy["sigma_rgb"], energy["sigma_xy"], energy["scale"]) == (
        scd.energy_sigma_rgb, scd.energy_sigma_xy, scd.energy_scale)
    assert (scd.varm_dilations, scd.varm_iters, scd.varm_w_rgb, scd.varm_w_var) == tuple(
        _field_defaults(VarmStep).values())


def test_one_threshold_grid_for_the_best_and_the_oracle_threshold() -> None:
    from training.metrics import DEFAULT_THRESHOLDS, best_threshold, oracle_miou

    assert inspect.signature(oracle_miou).parameters["thresholds"].default is DEFAULT_THRESHOLDS
    assert inspect.signature(best_threshold).parameters["thresholds"].default is DEFAULT_THRESHOLDS


@pytest.mark.parametrize("name", STEPS.names())
def test_every_step_has_valid_defaults_and_a_key(name: str) -> None:
    step = STEPS.get(name)()
    assert dataclasses.is_dataclass(step) and isinstance(step.starts_from_cam, bool)
    always = ",".join(f"{k}={getattr(step, k)}" for k in getattr(step, "key_always", ()))
    assert pipeline_key([{"step": name}]) == f"{name}({always})"  # only what a step always names
    assert pipeline_uses_gpu([{"step": name}]) is False


def test_sam_regions_need_a_gpu_superpixels_do_not() -> None:
    sam = [{"step": "regions", "backend": "sam", "proposal_params": {"checkpoint": "sam.pth"}}]
    assert pipeline_uses_gpu(sam) and not pipeline_uses_gpu([{"step": "regions"}])


# ---------------------------------------------------------------- the refine: section


def test_refine_section_parses_grids_actors_and_keeps_the_raw_section() -> None:
    raw = {"trials": ["a", "b"], "cpu_actors": None, "pipelines": [[{"step": "crf", "scale": {"grid": [2, 12]}}]]}
    section = RefineSection.from_dict(raw)
    assert section.pipelines == ([{"step": "crf", "scale": 2}], [{"step": "crf", "scale": 12}])
    assert (section.trials, section.cpu_actors, section.gpu_actors, section.max_retries) == (("a", "b"), 0, 0, 2)
    assert section.raw == raw
    assert section.rank_by == "miou"
    assert RefineSection.from_dict({**raw, "rank_by": "val_miou"}).rank_by == "val_miou"


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"pipelines": [[]], "trials": "best:0"}, r"refine\.trials: 'best:0'; expected best:K"),
        ({"pipelines": [[]], "trials": 3}, r"refine\.trials: expected best:K, all, or trial ids, got 3"),
        ({"pipelines": [[]], "rank_by": ""}, r"refine\.rank_by: expected a result key such as miou or val_miou"),
        ({"pipelines": [[]], "gpu_actors": -1}, r"refine\.gpu_actors: expected an integer ≥ 0, got -1"),
        ({"pipelines": [[]], "max_retry": 1}, r'unknown key\(s\) max_retry; .*\(did you mean "max_retries"\?\)'),
        ({"pipelines": [[{"step": "crf", "sacle": 1}]]}, r'no parameter\(s\) sacle; .*\(did you mean "scale"\?\)'),
        ({"pipelines": [[{"step": "regions", "backend": "sam"}]]}, r"proposal_params\.checkpoint: expected"),
    ],
)
def test_refine_section_errors_name_the_field(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RefineSection.from_dict(section)


# ---------------------------------------------------------------- facts and cross-field rules


def test_paradigm_facts() -> None:
    base = TrialConfig()
    cnn_baseline = base.replace(**{"transfer.paradigm": "baseline", "transfer.baseline_network": "teacher"})
    assert (cnn_baseline.transfer.cam_network, cnn_baseline.cam_net.name) == ("teacher", "resnet50")
    assert base.transfer.paradigm_info.frozen_teacher and base.transfer.cam_network == "student"
    co = base.replace(**{"transfer.paradigm": "co_training"}).transfer.paradigm_info
    assert co.transfer and not co.frozen_teacher and not co.teacher_cache
    scd = names.PARADIGMS.get("self_correspondence")
    assert scd.scd and not scd.transfer and not scd.frozen_teacher and scd.cam_network == "student"
    both = names.PARADIGMS.get("scd_with_teacher")
    assert both.scd and both.transfer and both.frozen_teacher and both.teacher_cache


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"transfer.paradigm": "baseline", "transfer.baseline_network": "teacher", "cam.layers": [-2, -1]},
         r"cam\.layers: layer fusion needs a ViT .* model\.teacher \(resnet50\)"),
        ({"cam.method": "gradcam", "cam.layers": [-1]}, r"cam\.layers: layer fusion is only implemented for .*weight"),
        ({"transfer.metric": "cosin"}, r'transfer\.metric: unknown transfer metric .*\(did you mean "cosine"\?\)'),
    ],
)  # fmt: skip
def test_cross_field_rules_fail_at_validate_time(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrialConfig().replace(**overrides)


def test_layer_fusion_of_a_vit_student_is_valid() -> None:
    assert from_dict(TrialConfig, {"cam": {"layers": [-2, -1]}}).cam.layers == (-2, -1)
