"""Refinement of a sweep's CAMs, fanned out over shards × pipeline settings.

The public API of refinement: build the work units of some trials
(:func:`make_units`), run them on Ray actors (:func:`refine_units`) or in a
plain loop (:func:`refine_reference`, same per-unit code), merge the per-shard
counts into one row per (trial, pipeline) (:func:`summarise`) and log them
(:func:`log_refinement`). The sweep file's ``refine:`` section picks trials
(:func:`select_trials`) and pipelines (:func:`expand_refine_grid`)::

    refine:
      trials: best:2          # or all, or a list of trial ids
      pipelines:
        - [{step: crf, scale: {grid: [2, 12, 16]}}]
        - [{step: crf, scale: 12}, {step: regions, backend: superpixel, fusion: {grid: [and, or, copy]}}]

File layout, skipping of finished units and the actor pool are described in
:mod:`orchestrator.refine_actors`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.refine_actors import (
    FAILED,
    SEED_SPEC,
    SKIPPED,
    RefineFailed,
    RefineUnit,
    UnitResult,
    attempt_unit,
    collect,
    read_counts,
    read_masks,
)
from postproc.pipeline import Pipeline
from training.config.refine import SEED_KEY, pipeline_key
from training.config.sweep import best_k, expand_refine_grid
from training.errors import ConfigError
from training.metrics import IoUCounter
from training.trial_dir import TrialDir

__all__ = [
    "RefineFailed", "RefineUnit", "UnitResult", "expand_refine_grid", "log_refinement", "make_units",
    "pipeline_key", "read_masks", "refine_reference", "refine_units", "select_trials", "summarise",
]

log = logging.getLogger(__name__)


def data_root(trial_dir: Path) -> Path:
    """The dataset folder of a trial, from its resolved ``config.yaml``."""
    from training.trial import prepare_data  # imports torch and timm: only where needed

    return prepare_data(_trial_config(trial_dir).data)


def seed_threshold(trial_dir: Path) -> float:
    """The trial's ``cam.threshold``: its refinement seeds (and CRF decisions) use the same one."""
    return _trial_config(trial_dir).cam.threshold


def _trial_config(trial_dir: Path):
    from training.config import load_trial_config

    return load_trial_config(TrialDir(trial_dir).config)


def make_units(
    trials: Mapping[str, Path] | Sequence[Path],
    specs: Sequence[Sequence[Mapping[str, Any]]],
    *,
    include_seed: bool = True,
) -> list[RefineUnit]:
    """Every (shard, pipeline) unit of the given trials, the seed pipeline first.

    Args:
        trials: {trial id: trial folder}, or folders (their names are the ids).
        specs: pipeline specs, e.g. from :func:`expand_refine_grid`.
        include_seed: add the threshold-only ``seed`` pipeline for before/after tables.
    """
    from training.shards import shard_paths

    if not isinstance(trials, Mapping):
        trials = {Path(t).name: Path(t) for t in trials}
    all_specs = ([SEED_SPEC] if include_seed else []) + [list(s) for s in specs]
    unique = list({pipeline_key(s): [dict(step) for step in s] for s in all_specs}.values())
    units = []
    for trial_id, trial_dir in trials.items():
        trial_dir = Path(trial_dir).resolve()
        root, shards = data_root(trial_dir), shard_paths(TrialDir(trial_dir).cams)
        threshold = seed_threshold(trial_dir)
        units += [RefineUnit(trial_dir, str(trial_id), s, root, spec, threshold) for spec in unique for s in shards]
    return units


def check_results(results: list[UnitResult]) -> list[UnitResult]:
    """Return ``results``, or raise :class:`RefineFailed` naming every failed unit."""
    failed = [r for r in results if r.status == FAILED]
    if failed:
        lines = "\n".join(f"  {r.unit}: {r.error}" for r in failed)
        raise RefineFailed(f"{len(failed)} of {len(results)} refinement unit(s) failed:\n{lines}", results)
    return results


def refine_reference(units: Sequence[RefineUnit]) -> list[UnitResult]:
    """Run the units one after another in this process (same per-unit code as the actors).

    Raises:
        RefineFailed: after every other unit has finished, listing the failed ones.
    """
    pipelines: dict[str, Pipeline] = {}
    results = []
    for unit in units:
        if read_counts(unit) is not None:
            results.append(collect(unit, {"status": SKIPPED}, 0))
        else:
            results.append(collect(unit, attempt_unit(unit, pipelines), 1))
    return check_results(results)


def refine_units(
    units: Sequence[RefineUnit],
    *,
    cpu_actors: int,
    gpu_actors: int = 0,
    max_retries: int = 2,
    progress: bool = True,
) -> list[UnitResult]:
    """Fan the units out over Ray actors; see :func:`orchestrator.refine_actors.fan_out`.

    Raises:
        RefineFailed: after every other unit has finished, listing the failed ones.
        ConfigError: SAM units without GPU actors, or no CPU actor for CPU units.
    """
    from orchestrator.refine_actors import fan_out

    results = fan_out(units, cpu_actors=cpu_actors, gpu_actors=gpu_actors, max_retries=max_retries, progress=progress)
    return check_results(results)


def summarise(results: Sequence[UnitResult], *, allow_partial: bool = False) -> list[dict[str, Any]]:
    """One row per (trial, pipeline): counters of its units merged.

    Args:
        results: unit results (e.g. ``RefineFailed.results``).
        allow_partial: also give rows for pairs with a failed unit (their shards missing).

    Returns:
        Rows ``{"trial_dir", "trial_id", "pipeline", "miou_refined",
        "miou_per_image_refined", "images", "shards"}``; the mIoUs are None
        when no image has smoke.
    """
    groups: dict[tuple[str, str], list[UnitResult]] = {}
    for result in results:
        groups.setdefault((str(result.unit.trial_dir), result.unit.key), []).append(result)
    rows = []
    for (trial_dir, key), members in groups.items():
        done = [m for m in members if m.status != FAILED]
        if not done or (len(done) < len(members) and not allow_partial):
            continue
        total = IoUCounter()
        for member in done:
            total = total.merge(member.counter)
        rows.append({
            "trial_dir": trial_dir, "trial_id": members[0].unit.trial_id, "pipeline": key,
            "miou_refined": total.miou if total.n_images else None,
            "miou_per_image_refined": total.miou_per_image if total.n_images else None,
            "images": total.n_images + total.n_skipped, "shards": len(done),
        })
    return rows




# ---------------------------------------------------------------- the sweep file's refine: section


def select_trials(rows: Sequence[Mapping[str, Any]], spec: str | Sequence[str], metric: str = "miou") -> list[str]:
    """Trial ids picked by ``best:K`` (highest ``metric`` first), ``all``, or ``id1,id2`` / a list.

    Args:
        rows: per-trial result rows with ``trial_id`` and ``metric``.
        spec: the ``refine.trials`` value.
        metric: the row key ranked by ``best:K``; rows without a finite value are not ranked.

    Raises:
        ConfigError: malformed spec, K < 1, or unknown trial ids (known ones listed).
    """
    ids = [str(row["trial_id"]) for row in rows]
    if isinstance(spec, str) and spec.strip() == "all":
        return ids
    k = best_k(spec)
    if k is not None:
        scored = [(float(r[metric]), str(r["trial_id"])) for r in rows if _finite(r.get(metric))]
        if not scored:
            raise ConfigError(f"refine.trials: {spec!r} but no trial has a numeric {metric!r}")
        return [tid for _, tid in sorted(scored, key=lambda pair: -pair[0])[:k]]
    wanted = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    wanted = [w for w in wanted if w]
    missing = [w for w in wanted if w not in ids]
    if not wanted or missing:
        raise ConfigError(
            f"refine.trials: unknown trial id(s) {', '.join(missing) or repr(spec)}; known: {', '.join(ids) or 'none'}"
        )
    return wanted


def _finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- MLflow


def metric_key(pipeline: str) -> str:
    """A pipeline key in MLflow's metric-name characters (alphanumerics, ``_ - . / space``)."""
    name = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_\-. /]", "_", pipeline)).strip("_") or "pipeline"
    return name if len(name) <= 200 else f"{name[:191]}-{hashlib.sha256(pipeline.encode()).hexdigest()[:8]}"


def log_refinement(tracking: Any, rows: Sequence[Mapping[str, Any]], trial_run_ids: Mapping[str, str],
                   *, overlay_images: int = 4) -> dict[str, str]:
    """Log refined mIoUs on each trial's child run and tables + overlays on the parent run.

    Child runs get ``refine/<key>/miou`` and ``refine/<key>/miou_per_image``
    (keys sanitised with :func:`metric_key`); trials without a run id are only
    in the tables. The parent run gets, under ``refine/``, the tables shaped
    like the thesis's Table 4.4 (rows: pipeline, columns: trial) as markdown and
    CSV, and ``overlays/<trial>/<key>.png`` (image | seed mask | refined mask).

    Args:
        tracking: the sweep's ``SweepTracking``.
        rows: from :func:`summarise`.
        trial_run_ids: {trial id: child run id}.
        overlay_images: images per overlay picture.

    Returns:
        {table name: markdown}.
    """
    from orchestrator.tables import TableSpec, pivot, to_csv, to_markdown

    for trial_id, run_id in trial_run_ids.items():
        metrics = {}
        for row in (r for r in rows if r["trial_id"] == trial_id and r["miou_refined"] is not None):
            metrics[f"refine/{metric_key(row['pipeline'])}/miou"] = row["miou_refined"]
            metrics[f"refine/{metric_key(row['pipeline'])}/miou_per_image"] = row["miou_per_image_refined"]
        if metrics:
            tracking.tracker(run_id).log_metrics(metrics)
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "refine"
        folder.mkdir()
        for value in ("miou_refined", "miou_per_image_refined"):
            spec = TableSpec(name=f"refine_{value}", rows=("pipeline",), columns=("trial_id",), value=value)
            table = pivot(rows, spec)
            texts[table.spec.name] = to_markdown(table)
            (folder / f"{table.spec.name}.md").write_text(texts[table.spec.name])
            (folder / f"{table.spec.name}.csv").write_text(to_csv(table))
        for row in rows:
            if row["pipeline"] != SEED_KEY:
                out = folder / "overlays" / metric_key(row["trial_id"]) / f"{metric_key(row['pipeline'])}.png"
                save_overlay(Path(row["trial_dir"]), row["pipeline"], out, n=overlay_images)
        tracking.parent.log_artifact(folder, "refine")
    return texts


def save_overlay(trial_dir: Path, key: str, out: Path, *, n: int = 4) -> Path | None:
    """One picture of the first ``n`` smoke images of the trial's first shard: image | seed | refined.

    Masks are drawn in red over the image with the expert mask's outline in
    green. Returns ``out``, or None when the seed or refined masks are missing.
    """
    import cv2
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from orchestrator.refine_actors import refine_dir
    from training.data import read_image, read_mask, scan_test

    seeds, refined = sorted(refine_dir(trial_dir, SEED_KEY).glob("*.masks.npz")), refine_dir(trial_dir, key)
    if not seeds or not (refined / seeds[0].name).is_file():
        return None
    seed_masks, refined_masks = read_masks(seeds[0]), read_masks(refined / seeds[0].name)
    items = {item.id: item for item in scan_test(data_root(trial_dir))}
    picked = []
    for image_id in (i for i in seed_masks if i in items):
        image = read_image(items[image_id].image)
        gt = read_mask(items[image_id].mask, shape=image.shape[:2])
        if gt.any() and len(picked) < n:
            picked.append((image_id, image, gt))
    fig = Figure(figsize=(7.5, 2.6 * max(1, len(picked))), dpi=100)  # no pyplot: no global state
    FigureCanvasAgg(fig)
    for row, (image_id, image, gt) in enumerate(picked):
        outline = gt & ~cv2.erode(gt.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        panels = [(image_id, None), ("seed", seed_masks[image_id]), (key[:40], refined_masks[image_id])]
        for col, (title, mask) in enumerate(panels):
            shown = image.copy()
            if mask is not None:
                shown[mask] = (0.5 * shown[mask] + [127, 0, 0]).astype(np.uint8)
                shown[outline] = (0, 255, 0)
            ax = fig.add_subplot(len(picked), 3, row * 3 + col + 1)
            ax.imshow(shown)
            ax.set_title(title, fontsize="small")
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
