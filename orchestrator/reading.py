"""A sweep's result in two plain lines: which arm won, by how much, and where each arm looks.

`wsss sweep` prints it last, under the tables, so a reader of the console sees the finding
without reading a pivot table. Pure: result rows in, text out (no Ray, no MLflow).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def arm_means(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[str, tuple[float, int]]:
    """Each arm's mean of ``metric`` over its trials and how many trials that is.

    Args:
        rows: result rows with ``arm`` and ``metric`` keys (`SweepDir.result_rows`); rows
            without a finite number for ``metric`` (failed trials) are skipped.
        metric: the result key to average.
    Returns:
        ``{arm: (mean, count)}``, best mean first.
    """
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            values[str(row.get("arm"))].append(float(value))
    means = {arm: (sum(v) / len(v), len(v)) for arm, v in values.items()}
    return dict(sorted(means.items(), key=lambda item: -item[1][0]))


def read_result(rows: Iterable[Mapping[str, Any]], *, metric: str = "miou", context: str = "context_activation") -> str:
    """Two lines: the arm with the best mean ``metric`` and its lead over the next arm, then every
    arm's mean ``context`` (the share of CAM mass on the chimney: lower means less shortcut).

    Args:
        rows: result rows of a sweep (`SweepDir.result_rows`).
        metric: what decides the winner (a fraction; shown in %).
        context: the context measure shown per arm (a fraction; shown in %).
    Returns:
        Two lines of text, e.g. ``"Reading: teacher_student has the best miou, 27.1%, 2.3 points
        above baseline_cnn (24.8%); then co_training 20.1%."`` and ``"Chimney share of the CAM
        (context_activation): teacher_student 6.1%, baseline_cnn 10.2%, co_training 7.7%."``
    """
    rows = list(rows)
    scores = arm_means(rows, metric)
    if not scores:
        return f"Reading: no finished trial has a {metric} yet.\n"
    ranked = list(scores.items())
    (best, (top, n_best)), rest = ranked[0], ranked[1:]
    first = f"Reading: {_named(best, n_best)} has the best {metric}, {_pct(top)}"
    if rest:
        runner, (second, n_runner) = rest[0]
        first += f", {100 * (top - second):.1f} points above {_named(runner, n_runner)} ({_pct(second)})"
        if rest[1:]:
            first += "; then " + ", ".join(f"{arm} {_pct(mean)}" for arm, (mean, _) in rest[1:])
    else:
        first += " (the only arm)"
    shares = arm_means(rows, context)
    shown = ", ".join(f"{arm} {_pct(shares[arm][0])}" for arm in scores if arm in shares)
    second_line = f"Chimney share of the CAM ({context}, lower = less shortcut): {shown or 'not measured'}."
    return f"{first}.\n{second_line}\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _named(arm: str, count: int) -> str:
    return arm if count == 1 else f"{arm} (mean of {count} trials)"
