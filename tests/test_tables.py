"""Results tables, plots, and their round trip through MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.tables import (
    TableSpec,
    lambda_curves,
    log_tables,
    pivot,
    plot_heatmap,
    plot_lambda,
    read_tables,
    results_table,
    to_csv,
    to_markdown,
)
from orchestrator.tracking import SweepTracking
from training.errors import ConfigError
from training.tracker import RecordingTracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(tid, paradigm, metric, miou, lam=1.0, level="global"):
    return {
        "trial_id": tid, "transfer.paradigm": paradigm, "transfer.metric": metric,
        "transfer.level": level, "transfer.lam": lam, "miou": miou,
    }


ROWS = [
    _row("a", "teacher_student", "cosine", 0.40),
    _row("b", "teacher_student", "cosine", 0.50),  # same cell as "a": averaged
    _row("c", "teacher_student", "l1", 0.3839),
    _row("d", "co_training", "cosine", 0.4593),
    _row("e", "co_training", "l1", None),  # failed trial: no value, cell missing
]
SPEC = TableSpec(name="metric", rows=("transfer.paradigm",), columns=("transfer.metric", "transfer.level"))


def test_spec_from_dict():
    spec = TableSpec.from_dict({"name": "t", "rows": "transfer.paradigm", "columns": ["transfer.metric"]})
    assert spec == TableSpec("t", ("transfer.paradigm",), ("transfer.metric",))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"name": "t", "rows": ["a"], "columns": ["b"], "colums": ["c"]}, "unknown key 'colums'"),
        ({"name": "t", "rows": ["a"]}, "missing key.*columns"),
        ({"name": "../x", "rows": ["a"], "columns": ["b"]}, "table name '../x'"),
        ({"name": "t", "rows": [], "columns": ["b"]}, "at least one"),
        ({"name": "t", "rows": ["a"], "columns": ["b"], "fmt": "{:d}"}, "fmt"),
    ],
)
def test_spec_from_dict_rejects(raw, match):
    with pytest.raises(ConfigError, match=match):
        TableSpec.from_dict(raw)


def test_pivot_averages_duplicates_and_keeps_counts():
    table = pivot(ROWS, SPEC)
    assert table.row_keys == (("co_training",), ("teacher_student",))
    assert table.col_keys == (("cosine", "global"), ("l1", "global"))
    cell = table.cells[(("teacher_student",), ("cosine", "global"))]
    assert cell.count == 2 and cell.mean == pytest.approx(45.0)
    assert cell.sd == pytest.approx(50**0.5)  # √(((40 − 45)² + (50 − 45)²) / (2 − 1)) = √50 = 7.07
    assert (("co_training",), ("l1", "global")) not in table.cells
    assert table.text(("co_training",), ("l1", "global")) == "—"


def test_pivot_sorts_numbers_numerically():
    rows = [_row(str(i), "ts", "cosine", 0.1, lam=lam) for i, lam in enumerate([1.3, 0.3, 10.0])]
    table = pivot(rows, TableSpec("lam", rows=("transfer.lam",), columns=("transfer.metric",)))
    assert table.row_keys == ((0.3,), (1.3,), (10.0,))


def test_pivot_does_not_mutate_rows():
    rows = [dict(r) for r in ROWS]
    pivot(rows, SPEC)
    assert rows == ROWS


def test_markdown_exact():
    assert to_markdown(pivot(ROWS, SPEC)) == (
        "| transfer.paradigm | cosine global | l1 global |\n"
        "|---|---|---|\n"
        "| co_training | 45.93 | — |\n"
        "| teacher_student | 45.00 ± 7.07 (n=2) | 38.39 |\n"
    )


def test_csv_exact():
    assert to_csv(pivot(ROWS, SPEC)) == (
        "transfer.paradigm,cosine global,l1 global\n"
        "co_training,45.93,\n"
        "teacher_student,45.00,38.39\n"
    )


def test_results_table_sorted_descending():
    md, text = results_table(ROWS[2:], ["trial_id", "transfer.metric", "miou"])
    assert md == (
        "| trial_id | transfer.metric | miou |\n"
        "|---|---|---|\n"
        "| d | cosine | 0.4593 |\n"
        "| c | l1 | 0.3839 |\n"
        "| e | l1 | — |\n"
    )
    assert text == "trial_id,transfer.metric,miou\nd,cosine,0.4593\nc,l1,0.3839\ne,l1,\n"


def test_lambda_curves_average_per_lambda():
    rows = [
        _row("a", "ts", "cosine", 0.2, lam=0.5),
        _row("b", "ts", "cosine", 0.4, lam=0.5),
        _row("c", "ts", "cosine", 0.5, lam=1.0),
        _row("d", "ct", "cosine", 0.3, lam=1.0),
    ]
    curves = lambda_curves(rows, value="miou", group_by=("transfer.paradigm",))
    assert curves[("ts",)] == [(0.5, pytest.approx(0.3)), (1.0, 0.5)]
    assert curves[("ct",)] == [(1.0, 0.3)]


def test_plots_write_png(tmp_path: Path):
    lam_rows = [*ROWS, _row("f", "teacher_student", "cosine", 0.45, lam=0.5)]
    line = plot_lambda(lam_rows, out=tmp_path / "a" / "lambda.png")
    heat = plot_heatmap(pivot(ROWS, SPEC), tmp_path / "heat.png")
    for path in (line, heat):
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_log_tables_twice_overwrites_and_reads_back(uri: str):
    sweep = SweepTracking.open(uri, "wsss", "tables1", space={"seed": 1}, description="")
    log_tables(sweep.parent, ROWS[:1], [SPEC])
    texts = log_tables(sweep.parent, ROWS, [SPEC])
    assert set(texts) == {"metric", "results"}

    client, run_id = sweep.client, sweep.parent_run_id
    assert sorted(f.path for f in client.list_artifacts(run_id, "tables")) == [
        "tables/metric.csv", "tables/metric.md", "tables/results.csv", "tables/results.md",
    ]
    assert sorted(f.path for f in client.list_artifacts(run_id, "plots")) == ["plots/lambda.png", "plots/metric.png"]

    back = read_tables(uri, "tables1")
    assert back == texts
    assert back["metric"] == to_markdown(pivot(ROWS, SPEC))


def test_log_tables_through_a_recording_tracker():
    """The parent run is any `Tracker`: a recorder lists what MLflow would (as the test above)."""
    parent = RecordingTracker()
    texts = log_tables(parent, ROWS, [SPEC])
    assert set(texts) == {"metric", "results"}
    assert parent.list_artifacts() == ["plots", "tables"]
    assert parent.list_artifacts("tables") == [
        "tables/metric.csv", "tables/metric.md", "tables/results.csv", "tables/results.md",
    ]
    assert parent.list_artifacts("plots") == ["plots/lambda.png", "plots/metric.png"]


def test_read_tables_unknown_sweep(uri: str):
    SweepTracking.open(uri, "wsss", "known", space={}, description="")
    with pytest.raises(ConfigError, match=r"'unknown'.*known"):
        read_tables(uri, "unknown")


def test_tables_pivot_on_the_heads_seg_miou():
    """Only trials with a segmentation head report seg_miou: the other arms' cells stay missing."""
    rows = [
        {"trial_id": "a", "arm": "baseline_vit", "train.seed": 42, "miou": 0.17},
        {"trial_id": "b", "arm": "self_correspondence", "train.seed": 42, "miou": 0.15, "seg_miou": 0.21},
        {"trial_id": "c", "arm": "self_correspondence", "train.seed": 43, "miou": 0.16, "seg_miou": 0.25},
    ]
    table = pivot(rows, TableSpec(name="seg", rows=("arm",), columns=("train.seed",), value="seg_miou"))
    assert table.row_keys == (("self_correspondence",),)
    assert to_markdown(table) == "| arm | 42 | 43 |\n|---|---|---|\n| self_correspondence | 21.00 | 25.00 |\n"
    cam = pivot(rows, TableSpec(name="cam", rows=("arm",), columns=("train.seed",), value="miou"))
    assert cam.text(("baseline_vit",), (43,)) == "—"
