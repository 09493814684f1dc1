"""What a user sees first on a sweep's parent run in the MLflow UI.

The run page opens on its description (rendered markdown) and its metrics. After every
sweep (and refinement) the description becomes: the sweep's own text, how many trials
finished, the best trial, the sweep's tables with their plots inline, and where the files
are; the best trial's metrics are logged on the parent so the runs list shows them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from orchestrator.tracking import NOTE_TAG, SweepTracking

# MLflow refuses tag values over 8,000 characters; tables past this budget are only linked.
NOTE_BUDGET = 7500
BEST_METRICS = ("miou", "miou_per_image", "accuracy", "context_activation", "context_fp")


def describe_sweep(
    tracking: SweepTracking,
    *,
    description: str,
    rows: Sequence[Mapping[str, Any]],
    total: int,
    failed: Sequence[str],
    tables: Mapping[str, str],
    rank_by: str = "miou",
    mode: str = "max",
) -> str:
    """Write the parent run's description and best-trial metrics; returns the markdown.

    The best trial is the one with the highest ``rank_by`` (the lowest with ``mode`` min).
    """
    ranked = [r for r in rows if isinstance(r.get(rank_by), int | float)]
    best = (max if mode == "max" else min)(ranked, key=lambda r: r[rank_by], default=None)
    parent = tracking.parent
    plots = {Path(name).stem for name in parent.list_artifacts("plots")}
    text = sweep_markdown(
        description=description, finished=len(rows), total=total, failed=failed, best=best, rank_by=rank_by,
        tables=tables, plot_url=lambda name: _artifact_url(tracking.parent_run_id, f"plots/{name}.png"), plots=plots,
    )  # fmt: skip
    metrics = {"trials_finished": float(len(rows)), "trials_failed": float(len(failed))}
    if best is not None:
        metrics |= {f"best_{k}": float(best[k]) for k in BEST_METRICS if isinstance(best.get(k), int | float)}
    parent.log_metrics(metrics)
    parent.set_tags({NOTE_TAG: text})
    return text


def sweep_markdown(
    *,
    description: str,
    finished: int,
    total: int,
    failed: Sequence[str],
    best: Mapping[str, Any] | None,
    rank_by: str,
    tables: Mapping[str, str],
    plot_url,
    plots: set[str],
) -> str:
    """The description's markdown (pure: tested without MLflow)."""
    head = [description.strip(), "", f"**{finished}/{total} trials finished**"]
    if failed:
        head[-1] += f", {len(failed)} failed ({', '.join(failed)})"
    if best is not None:
        shown = ", ".join(f"{k} {best[k]:.4g}" for k in BEST_METRICS if isinstance(best.get(k), int | float))
        head += ["", f"**Best by {rank_by}:** {best.get('run_name', best.get('trial_id'))} ({shown})"]
    footer = "\n\nEvery table is also in Artifacts → `tables/` (markdown and CSV), plots in `plots/`."
    parts, budget, left_out = ["\n".join(head)], NOTE_BUDGET - len(footer), []
    for name, table in tables.items():
        block = f"### {name}\n\n{table.strip()}"
        if name in plots:
            block += f"\n\n![{name}]({plot_url(name)})"
        if sum(len(p) + 2 for p in parts) + len(block) > budget:
            left_out.append(name)
            continue
        parts.append(block)
    if left_out:
        parts.append(f"*Too long to show here: {', '.join(left_out)}.*")
    return "\n\n".join(parts) + footer


def _artifact_url(run_id: str, path: str) -> str:
    """A link the UI serves from the run's artifacts (relative: works behind any host name)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"
