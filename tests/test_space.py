"""Search spaces: parsing, validation and deterministic expansion (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.space import check_checkpoints, expand, load_space, run_name
from training.errors import CheckpointError, ConfigError

SHIPPED = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
TINY_BASE = {
    "data": {"synth": {"size": 32, "n_train": 16, "n_test": 8}, "image_size": 32},
    "train": {"epochs": 1},
}


def write_space(tmp_path: Path, body: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": TINY_BASE, **body}, sort_keys=False))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_space_validates(path):
    space = load_space(path)
    trials = expand(space)
    assert trials, f"{path.name} expands to no trial"
    assert len({t.id for t in trials}) == len(trials)
    check_checkpoints(trials)  # registered weights names (pretrained: efficientnet_lite0_imagenet) are no files


def test_grid_is_a_cartesian_product_with_zipped_axes_and_includes(tmp_path):
    space = load_space(write_space(tmp_path, {
        "grid": {
            "transfer.paradigm": ["teacher_student", "co_training"],
            "transfer.metric,transfer.level": [["cosine", "global"], ["l1", "global"], ["cosine", "spatial"]],
        },
        "include": [{"transfer.paradigm": "baseline"}],
    }))  # fmt: skip
    trials = expand(space)
    assert len(trials) == 2 * 3 + 1
    pairs = {(t.config.transfer.paradigm, t.config.transfer.metric, t.config.transfer.level) for t in trials}
    assert ("co_training", "l1", "global") in pairs
    assert trials[-1].config.transfer.paradigm == "baseline"
    assert [t.id for t in trials][:2] == ["000-teacher_student-cosine-global", "001-teacher_student-l1-global"]


def test_expansion_is_deterministic_and_samplers_are_seeded(tmp_path):
    body = {"sample": {"transfer.lam": {"loguniform": [0.1, 2.0]}}, "num_samples": 4, "sample_seed": 7}
    first = expand(load_space(write_space(tmp_path, body)))
    again = expand(load_space(write_space(tmp_path, body)))
    lams = [t.config.transfer.lam for t in first]
    assert lams == [t.config.transfer.lam for t in again]
    assert len(set(lams)) == 4 and all(0.1 <= x <= 2.0 for x in lams)
    other = expand(load_space(write_space(tmp_path, body | {"sample_seed": 8})))
    assert lams != [t.config.transfer.lam for t in other]


def test_duplicate_trials_are_dropped(tmp_path):
    space = load_space(write_space(tmp_path, {"grid": {"transfer.lam": [1.0, 1.0, 0.5]}}))
    assert [t.config.transfer.lam for t in expand(space)] == [1.0, 0.5]


def test_threads_default_to_the_trial_cpus(tmp_path):
    space = load_space(write_space(tmp_path, {"resources": {"cpu": 2}}))
    assert expand(space)[0].config.train.threads == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"gird": {}}, "unknown section"),
        ({"grid": {"transfer.lam": []}}, "grid.transfer.lam: expected a non-empty list"),
        ({"grid": {"transfer.lamda": [1.0]}}, 'did you mean "lam"'),
        ({"grid": {"transfer.metric,transfer.level": [["l1"]]}}, "list of 2 items"),
        ({"grid": {"transfer.metric,transfer.level": [["l1", "spatial"]]}}, "use level=global"),
        ({"grid": {"transfer.lam": [-1.0]}}, "λ ≥ 0"),
        ({"grid": {"transfer.paradigm": ["teacher_studnet"]}}, "teacher_student"),
        ({"grid": {"cam.scales": [[]]}}, "at least one scale"),
        ({"sample": {"transfer.lam": {"gaussian": [0, 1]}}}, "unknown sampler"),
        ({"sample": {"transfer.lam": {"uniform": [2, 1]}}}, "low < high"),
        ({"resources": {"gpu": 1.5}}, "fraction is only allowed below 1"),
        ({"resources": {"cpu": 0}}, "resources.cpu: expected > 0"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
        ({"tables": [{"name": "t", "rows": ["arm"], "columns": ["x"], "colour": "red"}]}, "colour"),
    ],
)
def test_bad_spaces_name_the_culprit(tmp_path, body, expected):
    with pytest.raises(ConfigError, match=r"space\.yaml") as err:
        expand(load_space(write_space(tmp_path, body)))
    assert expected in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base: {}\ngrid:\n  transfer.lam: [1.0, 2.0\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+"):
        load_space(path)


def test_base_given_as_a_relative_path(tmp_path):
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "t.yaml").write_text(yaml.safe_dump(TINY_BASE))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "trials/t.yaml", "set": {"transfer.lam": 0.5}}))
    (trial,) = expand(load_space(path, ["train.epochs=2"]))
    assert trial.config.transfer.lam == 0.5 and trial.config.train.epochs == 2


def test_run_names_say_paradigm_metric_level_lambda(tmp_path):
    space = load_space(write_space(tmp_path, {"grid": {"transfer.lam": [0.5]}, "include": [
        {"transfer.paradigm": "baseline", "transfer.baseline_network": "teacher"}]}))  # fmt: skip
    ts, base = expand(space)
    assert run_name(ts.config, ts.overrides) == "teacher_student · cosine · global · λ=0.5"
    assert base.run_name.startswith("baseline · CNN (resnet50)")


def test_the_scd_grid_gives_its_settings_to_the_scd_arms_only():
    """scd_cpu.yaml: 4 arms × 3 seeds; the CPU-sized SCD settings reach exactly the two SCD arms,
    whose ids and run names say so; table rows (``arm``) name each paradigm."""
    from orchestrator.space import arm

    trials = expand(load_space(Path(__file__).parents[1] / "search_spaces" / "scd_cpu.yaml"))
    assert len(trials) == 12
    arms = {t.id: arm(t.config) for t in trials}
    assert sorted(set(arms.values())) == ["baseline_vit", "scd_with_teacher", "self_correspondence", "teacher_student"]
    for t in trials:
        uses_scd = t.config.transfer.paradigm in ("self_correspondence", "scd_with_teacher")
        assert (t.config.scd is not None) is uses_scd
        if uses_scd:
            assert (t.config.scd.points, t.config.scd.scale, t.config.scd.warmup_fraction) == (12, 0.5, 0.1)
            assert t.id.endswith("-scd") and t.run_name.endswith("scd(9 settings)")
    assert {t.config.train.seed for t in trials} == {42, 43, 44}


def test_validate_lists_the_scd_paradigms(capsys):
    from orchestrator.cli import main

    assert main(["validate", str(Path(__file__).parents[1] / "search_spaces" / "scd_cpu.yaml"), "--list"]) == 0
    out = capsys.readouterr().out
    assert "by paradigm: baseline 3, scd_with_teacher 3, self_correspondence 3, teacher_student 3" in out
    assert "002-seed42-self_correspondence-scd: self_correspondence · ViT (vit_tiny_patch16_224) · seed=42" in out
    assert "003-seed42-scd_with_teacher-scd: scd_with_teacher · cosine · global · λ=1 · seed=42" in out


def test_packaged_weights_names_are_not_checkpoint_files(tmp_path):
    """`pretrained: efficientnet_lite0_imagenet` names weights a package ships, not a file to look for."""
    from orchestrator.space import check_checkpoints

    teacher = {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0_imagenet"}
    base = TINY_BASE | {"model": {"teacher": teacher}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": base}))
    check_checkpoints(expand(load_space(path)))  # no error
    base["model"]["teacher"]["pretrained"] = str(tmp_path / "missing.pth")
    path.write_text(yaml.safe_dump({"base": base}))
    with pytest.raises(CheckpointError, match=r"does not exist: model\.teacher\.pretrained=.*missing\.pth"):
        check_checkpoints(expand(load_space(path)))
