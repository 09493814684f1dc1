"""Refinement of a whole sweep: pick trials, fan the units out, log the tables.

Runs automatically after the grid when the sweep file has a ``refine:`` section,
or on demand with ``wsss refine NAME``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from orchestrator.refine import log_refinement, make_units, refine_units, select_trials, summarise
from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import SweepTracking
from training.atomic import atomic_write_json
from training.config.sweep import RefineSection
from training.errors import ConfigError


def refine_sweep(
    section: RefineSection,
    sweep: SweepDir,
    tracking: SweepTracking,
    *,
    trials: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Refine the chosen trials of ``sweep`` with every pipeline of ``section``.

    Args:
        section: the sweep file's validated ``refine:`` section (pipelines, trials, actors).
        sweep: the sweep's folder.
        tracking: the sweep's MLflow runs.
        trials: ``best:K``, ``all`` or ``id,id``; overrides ``section["trials"]``.
    Returns:
        {table name: markdown} of the refinement tables (also logged on the parent run).
    """
    rows = sweep.result_rows()
    if not rows:
        raise ConfigError(f"{sweep.root}: no finished trial to refine yet")
    chosen = select_trials(rows, trials or section.trials, metric=section.rank_by)
    units = make_units({t: sweep.trial(t).path for t in chosen}, section.pipelines)
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
        tracking.parent.set_tags(
            {"wsss.refine_nodes": ", ".join(f"{node[:12]}: {n} units" for node, n in spread.most_common())}
        )
    marker = {"section": dict(section.raw), "trials": chosen, "tables": tables, "nodes": nodes}
    atomic_write_json(sweep.refine_marker, marker, indent=None)
    return tables


def refined_tables(section: RefineSection, sweep: SweepDir) -> dict[str, str] | None:
    """The tables of an earlier complete refinement with this same section (as written), or None."""
    path = sweep.refine_marker
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done["tables"] if done.get("section") == json.loads(json.dumps(dict(section.raw))) else None


def _cpus() -> int:
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1
