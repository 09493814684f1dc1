"""Search spaces: parsing, validation and deterministic expansion (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.space import check_checkpoints, expand, load_space, run_name
from training.errors import ConfigError

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
