"""Each arm's mean ± sd over the finished trials of one or more sweep folders.

For a benchmark whose seeds ran in more than one sweep (e.g. the demo's seed 42 and the other
seeds in ``paradigms_quick``): the trials must share everything but ``train.seed``, which this
script does not check beyond printing each trial's arm and seed. An arm's seed that two folders
both hold counts once, from the folder named first. Prints a markdown table:
one row per arm, one column per metric, ``mean ± sd (n)`` (sample sd; n = trials).

Usage::

    .venv/bin/python benchmarks/arm_rows.py runs/quick runs/paradigms_quick --metrics miou,accuracy
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from orchestrator.sweep_dir import SweepDir

DEFAULT_METRICS = "accuracy,accuracy_decoupled,miou,val_miou,oracle_miou,context_activation,context_fp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (<storage>/<name>)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated result keys")
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[str, float]] = set()
    for folder in args.sweeps:
        for row in SweepDir(folder.resolve()).result_rows():
            if (row["arm"], row["train.seed"]) in seen:
                continue
            seen.add((row["arm"], row["train.seed"]))
            print(f"<!-- {folder.name}/{row['trial_id']}: {row['arm']} seed {row['train.seed']:g} -->")
            for m in metrics:
                if isinstance(row.get(m), int | float):
                    values[row["arm"]][m].append(float(row[m]))
    print("| arm | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for arm_name, per_metric in sorted(values.items()):
        print(f"| {arm_name} | " + " | ".join(_cell(per_metric.get(m, [])) for m in metrics) + " |")


def _cell(v: list[float]) -> str:
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.3f} (1)"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} ({len(v)})"


if __name__ == "__main__":
    main()
