"""Refinement of a whole sweep: pick trials, fan the units out, log the tables.

Runs automatically after the grid when the sweep file has a ``refine:`` section,
or on demand with ``wsss refine NAME``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from orchestrator import sweep as sw
from orchestrator.refine import log_refinement, make_units, refine_units, select_trials, summarise
from orchestrator.tracking import SweepTracking
from training.config.sweep import RefineSection
from training.errors import ConfigError
from training.shards import atomic_write_text

MARKER = "refine.json"


def refine_sweep(
    section: RefineSection,
    root: Path,
    tracking: SweepTracking,
    *,
    trials: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Refine the chosen trials of the sweep in ``root`` with every pipeline of ``section``.

    Args:
        section: the sweep file's validated ``refine:`` section (pipelines, trials, actors).
        root: the sweep folder.
        tracking: the sweep's MLflow runs.
        trials: ``best:K``, ``all`` or ``id,id``; overrides ``section["trials"]``.
    Returns:
        {table name: markdown} of the refinement tables (also logged on the parent run).
    """
    rows = sw.result_rows(root)
    if not rows:
        raise ConfigError(f"{root}: no finished trial to refine yet")
    chosen = select_trials(rows, trials or section.trials, metric=section.rank_by)
    units = make_units({t: root / "trials" / t for t in chosen}, section.pipelines)
    results = refine_units(
        units,
        cpu_actors=section.cpu_actors or _cpus(),
        gpu_actors=section.gpu_actors,
        max_retries=section.max_retries,
        progress=progress,
    )
    run_ids = {t: run.info.run_id for t in chosen if (run := tracking.find_child(t)) is not None}
    tables = log_refinement(tracking, summarise(results), run_ids)
    # Which node refined which unit: on a cluster, where the work went (and where to look for logs).
    nodes = {str(r.unit): r.node for r in results if r.node}
    if nodes:
        spread = Counter(nodes.values())
        tracking.tracker(tracking.parent_run_id).set_tags(
            {"wsss.refine_nodes": ", ".join(f"{node[:12]}: {n} units" for node, n in spread.most_common())}
        )
    marker = {"section": dict(section.raw), "trials": chosen, "tables": tables, "nodes": nodes}
    atomic_write_text(root / MARKER, json.dumps(marker))
    return tables


def refined_tables(section: RefineSection, root: Path) -> dict[str, str] | None:
    """The tables of an earlier complete refinement with this same section (as written), or None."""
    path = root / MARKER
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done["tables"] if done.get("section") == json.loads(json.dumps(dict(section.raw))) else None


def _cpus() -> int:
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1
