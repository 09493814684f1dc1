"""The two-line reading `wsss sweep` prints under its tables (`orchestrator.reading`)."""

from __future__ import annotations

import math

import pytest

from orchestrator.reading import arm_means, read_result


def _row(arm: str, miou, context=0.05, **extra) -> dict:
    return {"arm": arm, "miou": miou, "context_activation": context, "trial_id": f"{arm}-{miou}", **extra}


def test_the_winner_its_lead_and_every_arms_context() -> None:
    rows = [
        _row("baseline_cnn", 0.248, 0.102),
        _row("teacher_student", 0.271, 0.061),
        _row("co_training", 0.201, 0.077),
        _row("baseline_vit", 0.152, 0.081),
    ]
    # 27.1 − 24.8 = 2.3 points; arms by miou, the context line in the same order
    assert read_result(rows) == (
        "Reading: teacher_student has the best miou, 27.1%, 2.3 points above baseline_cnn (24.8%); "
        "then co_training 20.1%, baseline_vit 15.2%.\n"
        "Chimney share of the CAM (context_activation, lower = less shortcut): "
        "teacher_student 6.1%, baseline_cnn 10.2%, co_training 7.7%, baseline_vit 8.1%.\n"
    )


def test_several_trials_of_an_arm_are_averaged_and_counted() -> None:
    rows = [_row("teacher_student", 0.30, 0.04), _row("teacher_student", 0.20, 0.08), _row("baseline_vit", 0.22)]
    # teacher_student: (0.30 + 0.20) / 2 = 0.25 → 25.0%, 3.0 points above 22.0%; context (4 + 8) / 2 = 6.0%
    lines = read_result(rows).splitlines()
    assert lines[0] == (
        "Reading: teacher_student (mean of 2 trials) has the best miou, 25.0%, 3.0 points above baseline_vit (22.0%)."
    )
    assert lines[1].endswith("teacher_student 6.0%, baseline_vit 5.0%.")


def test_failed_trials_are_skipped() -> None:
    rows = [_row("co_training", math.nan), _row("co_training", None), _row("baseline_vit", 0.1), {"arm": "x"}]
    assert arm_means(rows, "miou") == {"baseline_vit": (0.1, 1)}
    assert read_result(rows).splitlines()[0] == "Reading: baseline_vit has the best miou, 10.0% (the only arm)."


@pytest.mark.parametrize("rows", [[], [_row("baseline_vit", None)]])
def test_nothing_finished_is_said_in_one_line_not_a_crash(rows: list) -> None:
    assert read_result(rows) == "Reading: no finished trial has a miou yet.\n"


def test_other_metrics_can_decide_and_a_missing_context_is_said() -> None:
    rows = [{"arm": "a", "val_miou": 0.3}, {"arm": "b", "val_miou": 0.1}]
    text = read_result(rows, metric="val_miou")
    assert text.splitlines() == [
        "Reading: a has the best val_miou, 30.0%, 20.0 points above b (10.0%).",
        "Chimney share of the CAM (context_activation, lower = less shortcut): not measured.",
    ]


def test_rows_are_not_mutated() -> None:
    rows = [_row("baseline_vit", 0.2)]
    before = [dict(r) for r in rows]
    read_result(rows)
    assert rows == before
