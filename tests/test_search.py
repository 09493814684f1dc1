"""``search:``: its schema, and Optuna's suggestions read from and written to a sweep folder.

No Ray and no training: a trial "runs" by writing its metrics.json with a known
objective, so what the searcher sees is exactly what a finished trial leaves.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from orchestrator.cli import main
from orchestrator.search import distributions, history, importances, observations, point_params, suggest
from orchestrator.search_report import history_markdown, importances_markdown
from orchestrator.space import expand, load_space
from orchestrator.sweep_dir import SweepDir
from training.errors import ConfigError

SAMPLE = {"transfer.lam": {"loguniform": [0.1, 10.0]}, "transfer.metric": {"choice": ["cosine", "l1", "l2"]}}


def _write(tmp_path: Path, name: str = "s", **sections) -> Path:
    base = tiny_config_dict()
    base["transfer"]["paradigm"] = "co_training"
    base["data"]["val_fraction"] = 0.25
    body = {"name": name, "base": base, "sample": SAMPLE,
            "search": {"num_trials": 8, "seed": 0, "startup_trials": 3}} | sections  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in body.items() if v is not None}, sort_keys=False))
    return path


def objective(overrides: dict) -> float:
    """Best at λ = 0.8 with l1: -|ln λ - ln 0.8| + 0.1·[l1]; e.g. λ 0.8, l1 → 0.1; λ 8, cosine → -2.303."""
    return -abs(math.log(overrides["transfer.lam"] / 0.8)) + 0.1 * (overrides["transfer.metric"] == "l1")


def _search(space, sweep: SweepDir, n: int) -> list:
    """Suggest and "run" n trials one after another (``max_concurrent: 1``)."""
    out = []
    for _ in range(n):
        trial = suggest(space, sweep)
        sweep.record_suggestion(trial)
        sweep.trial(trial.id).create().write_metrics({"val_miou": objective(trial.overrides)})
        out.append(trial)
    return out


def _sweep(tmp_path: Path, space, name: str = "s") -> SweepDir:
    sweep = SweepDir.of(tmp_path / "runs", name)
    sweep.record(space, expand(space))
    return sweep


# ---------------------------------------------------------------- the schema


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"search": {"num_trials": 4, "algorithm": "hyperopt"}}, r"search.algorithm: .*hyperopt.*optuna"),
        ({"sample": None}, r"search: nothing to search; `sample:` names no distribution"),
        ({"search": {"num_trials": 4, "mode": "maximize"}}, r"search.mode: expected max or min, got 'maximize'"),
        ({"search": {"num_trials": 4, "metric": "val_mIoU"}}, r"search.metric: no trial reports 'val_mIoU'.*val_miou"),
        ({"search": {"num_trials": 4, "metric": "miou"}}, r"search.metric: miou is measured on the test split"),
        ({"search": {"num_trials": 4, "seeed": 1}}, r"search.seeed: unknown key.*seed"),
        ({"search": {"metric": "val_miou"}}, r"search.num_trials: missing"),
        ({"search": {"num_trials": 0}}, r"search.num_trials"),
        ({"num_samples": 3}, r"num_samples: not used with search:"),
        ({"scheduler": {"type": "asha", "metric": "val_miou"}}, r"scheduler.metric: no trial reports 'val_miou'"),
    ],
)
def test_a_bad_search_section_names_its_field(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_space(_write(tmp_path, **sections))


def test_known_points_must_leave_something_to_suggest(tmp_path):
    space = load_space(_write(tmp_path, grid={"transfer.lam": [0.5, 1.0]}, search={"num_trials": 2}))
    with pytest.raises(ConfigError, match=r"search.num_trials: 2 leaves nothing to suggest after the 2 known"):
        expand(space)


def test_a_test_metric_without_a_validation_split_is_a_warning(tmp_path):
    path = _write(tmp_path, search={"num_trials": 4, "metric": "miou"}, set={"data.val_fraction": 0.0})
    (warning,) = load_space(path).warnings
    assert "chooses settings on the test set" in warning


def test_validate_prints_the_budget(tmp_path, capsys):
    path = _write(tmp_path, include=[{"transfer.lam": 1.0}], scheduler={"type": "asha", "metric": "val_miou_1x"})
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "searches 8 trials: 1 known point(s) (grid × include) first, then 7 suggested by optuna" in out
    assert "over transfer.lam, transfer.metric; max val_miou, seed 0, 3 random startup trials; asha" in out


def test_distributions_follow_the_samplers():
    dists = distributions({"a": {"randint": [2, 5]}, "b": {"loguniform": [0.1, 1.0]}, "c": {"choice": [1, "x"]}})
    assert (dists["a"].low, dists["a"].high) == (2, 4)  # randint excludes its high, like numpy's
    assert dists["b"].log and dists["c"].choices == (1, "x")


# ---------------------------------------------------------------- suggestions


def test_suggestions_are_recorded_in_order_with_readable_ids(tmp_path):
    space = load_space(_write(tmp_path))
    sweep = _sweep(tmp_path, space)
    trials = _search(space, sweep, 4)
    assert [t.id[:4] for t in trials] == ["000-", "001-", "002-", "003-"]
    lam, metric = trials[0].overrides["transfer.lam"], trials[0].overrides["transfer.metric"]
    assert trials[0].id == f"000-lam{lam:.4g}-{metric}"
    assert trials[0].run_name == f"co_training · {metric} · global · λ={lam:g}"
    listing = sweep.load_trials()
    assert list(listing) == [t.id for t in trials] and {r["origin"] for r in listing.values()} == {"suggested"}
    assert sweep.status().total == 8 and not sweep.status().settled  # the budget, not what ran so far


def test_a_seeded_search_reproduces_and_an_interrupted_one_goes_on_the_same(tmp_path):
    space = load_space(_write(tmp_path))
    whole = [t.overrides for t in _search(space, _sweep(tmp_path, space, "a"), 7)]
    cut = _sweep(tmp_path, space, "b")
    first = [t.overrides for t in _search(space, cut, 4)]
    resumed = SweepDir.of(tmp_path / "runs", "b")  # a new driver: nothing kept in memory
    assert resumed.record(space, expand(space))[-1].overrides == first[-1]  # its suggestions come back
    rest = [t.overrides for t in _search(space, resumed, 3)]
    assert first + rest == whole
    assert len({(o["transfer.metric"], o["transfer.lam"]) for o in whole}) == 7  # nothing repeated
    other = load_space(_write(tmp_path, "c", search={"num_trials": 8, "seed": 1, "startup_trials": 3}))
    assert [t.overrides for t in _search(other, _sweep(tmp_path, other, "c"), 2)] != whole[:2]


def test_tpe_beats_random_search_on_the_same_budget(tmp_path):
    def last_half(startup: int, name: str) -> float:
        space = load_space(_write(tmp_path, name, search={"num_trials": 16, "seed": 1, "startup_trials": startup}))
        values = [objective(t.overrides) for t in _search(space, _sweep(tmp_path, space, name), 16)]
        return sum(values[8:]) / 8

    # seeded, measured: TPE after 4 random points -0.49, 16 random points -1.35 (seeds 0-3: TPE better each time)
    assert last_half(4, "tpe") > last_half(16, "random") + 0.3


def test_known_points_inside_the_space_are_observations_and_the_others_are_not(tmp_path):
    include = [{"transfer.lam": 0.5}, {"transfer.paradigm": "baseline"}, {"transfer.lam": 20.0}]
    space = load_space(_write(tmp_path, include=include))
    sweep = _sweep(tmp_path, space)
    known = sweep.recorded_trials()
    assert point_params(space, known[0]) == {"transfer.lam": 0.5, "transfer.metric": "cosine"}  # base fills in
    assert point_params(space, known[1]) is None  # another key: another objective
    assert point_params(space, known[2]) is None  # λ 20 lies outside loguniform [0.1, 10]
    for t in known:
        sweep.trial(t.id).create().write_metrics({"val_miou": 0.5})
    sweep.trial(_search(space, sweep, 1)[0].id)  # the first suggestion is numbered after the known points
    observed = observations(space, sweep)
    assert [o.trial_id[:3] for o in observed] == ["000", "003"]


def test_diverged_and_stopped_trials_are_told_as_failed_and_pruned(tmp_path):
    space = load_space(_write(tmp_path))
    sweep = _sweep(tmp_path, space)
    a, b, c = _search(space, sweep, 3)
    sweep.trial(b.id).metrics.unlink()
    sweep.trial(b.id).mark_diverged("loss is nan")
    sweep.trial(c.id).metrics.unlink()
    sweep.trial(c.id).mark_stopped("stopped by ASHA", epoch=1)
    assert [(o.state, o.value is None) for o in observations(space, sweep)] == [
        ("complete", False), ("failed", True), ("pruned", True),
    ]  # fmt: skip
    status = sweep.status()
    assert status.stopped == [c.id] and status.failed == [b.id] and status.finished == [a.id]
    assert _search(space, sweep, 1)[0].id.startswith("003-")  # a pruned point still counts as tried


def test_a_search_folder_refuses_another_search_but_its_budget_may_grow(tmp_path):
    space = load_space(_write(tmp_path))
    sweep = _sweep(tmp_path, space)
    _search(space, sweep, 3)
    grown = load_space(_write(tmp_path, search={"num_trials": 12, "seed": 0, "startup_trials": 3}))
    assert len(sweep.record(grown, expand(grown))) == 3 and sweep.budget() == 12
    for changed in ({"search": {"num_trials": 12, "seed": 5, "startup_trials": 3}},
                    {"search": {"num_trials": 2, "seed": 0, "startup_trials": 3}},
                    {"sample": {"transfer.lam": {"uniform": [0.1, 2.0]}}}):  # fmt: skip
        other = load_space(_write(tmp_path, "t", **changed))
        with pytest.raises(ConfigError, match="holds another search space"):
            sweep.record(other, expand(other))


# ---------------------------------------------------------------- what the parent run shows


def test_history_is_the_best_so_far_in_suggestion_order(tmp_path):
    space = load_space(_write(tmp_path))
    sweep = _sweep(tmp_path, space)
    a, b, c = _search(space, sweep, 3)
    for trial, value in ((a, 0.2), (b, 0.1), (c, 0.4)):
        sweep.trial(trial.id).write_metrics({"val_miou": value})
    observed = observations(space, sweep)
    assert history(observed, "max") == [(1, 0.2, 0.2), (2, 0.1, 0.2), (3, 0.4, 0.4)]
    assert history(observed, "min") == [(1, 0.2, 0.2), (2, 0.1, 0.1), (3, 0.4, 0.1)]
    md = history_markdown(observed, "max", "val_miou")
    assert md.splitlines()[3] == f"| 2 | {b.id} | complete | 0.1 | 0.2 |"


def test_importances_rank_the_parameter_the_objective_depends_on(tmp_path):
    space = load_space(_write(tmp_path, search={"num_trials": 12, "seed": 0, "startup_trials": 12}))
    sweep = _sweep(tmp_path, space)
    for t in _search(space, sweep, 12):  # the value depends on λ only
        sweep.trial(t.id).write_metrics({"val_miou": -abs(math.log(t.overrides["transfer.lam"]))})
    found = importances(space, observations(space, sweep))
    assert list(found) == ["transfer.lam", "transfer.metric"] and found["transfer.lam"] > 0.8
    assert abs(sum(found.values()) - 1.0) < 1e-6
    assert importances_markdown(found).splitlines()[2].startswith("| transfer.lam | 0.")
    assert importances(space, observations(space, sweep)[:1]) == {}  # one trial ranks nothing
