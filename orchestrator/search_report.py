"""What a search shows on the sweep's parent run: its history and Optuna's parameter importances.

`search_tables` writes two tables beside the sweep's own, so the parent run's
description (`orchestrator.summary`) shows them with their plot inline:

- ``search_history``: each settled trial in the order it was suggested, its
  value and the best value so far (plot: best-so-far against trial number);
- ``parameter_importances``: Optuna's fANOVA importance of each ``sample:`` key.

The best trial so far is also logged as it changes (`report_progress`, after
every trial): metric ``search_best_<metric>`` at step n (MLflow draws it against
the trial number) and tag ``wsss.search.best_trial``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from orchestrator.search import Observation, history, importances, observations
from orchestrator.space import SearchSpace
from orchestrator.sweep_dir import SweepDir
from orchestrator.tables import new_figure
from orchestrator.tracking import SweepTracking

HISTORY, IMPORTANCES = "search_history", "parameter_importances"
BEST_TAG = "wsss.search.best_trial"


def history_markdown(observed: Sequence[Observation], mode: str, metric: str) -> str:
    """| n | trial | state | metric | best so far | (pure)."""
    lines = [f"| n | trial | state | {metric} | best so far ({mode}) |", "|---|---|---|---|---|"]
    for (n, value, best), o in zip(history(observed, mode), observed, strict=True):
        lines.append(f"| {n} | {o.trial_id} | {o.state} | {_num(value)} | {_num(best)} |")
    return "\n".join(lines) + "\n"


def importances_markdown(found: dict[str, float]) -> str:
    """| parameter | importance | (pure); a note when too few trials completed."""
    if not found:
        return "*Not enough completed trials with varied parameters to rank them yet.*\n"
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in found.items())
    return f"| parameter | importance (fANOVA) |\n|---|---|\n{rows}\n"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def plot_history(observed: Sequence[Observation], mode: str, metric: str, out: Path) -> Path:
    """Each trial's value (dots) and the best so far (steps) against the trial number; a PNG."""
    points = history(observed, mode)
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    done = [(n, v) for n, v, _ in points if v is not None]
    best = [(n, b) for n, _, b in points if b is not None]
    if done:
        ax.plot(*zip(*done, strict=True), "o", alpha=0.5, label=f"trial's {metric}")
        ax.step(*zip(*best, strict=True), where="post", label="best so far")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("trial number (in the order suggested)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def search_tables(space: SearchSpace, sweep: SweepDir, tracking: SweepTracking) -> dict[str, str]:
    """Write and log the search's two tables and its history plot; returns {name: markdown}."""
    search = space.search
    observed = observations(space, sweep)
    texts = {
        HISTORY: history_markdown(observed, search.mode, search.metric),
        IMPORTANCES: importances_markdown(importances(space, observed)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            (Path(tmp) / "tables").mkdir(exist_ok=True)
            (Path(tmp) / "tables" / f"{name}.md").write_text(text)
        plot_history(observed, search.mode, search.metric, Path(tmp) / "plots" / f"{HISTORY}.png")
        for sub in ("tables", "plots"):
            tracking.parent.log_artifact(Path(tmp) / sub, sub)
    return texts


def report_progress(space: SearchSpace, sweep: SweepDir, tracking: SweepTracking) -> None:
    """The best trial so far on the parent run (a metric per trial number, a tag)."""
    search = space.search
    observed = observations(space, sweep)
    points = history(observed, search.mode)
    if not points or points[-1][2] is None:
        return
    n, _, best = points[-1]
    tracking.parent.log_metrics({f"search_best_{search.metric}": best}, step=n)
    best_id = next(o.trial_id for o in observed if o.value == best)
    tracking.parent.set_tags({BEST_TAG: f"{best_id} ({search.metric} {best:.4g}, after {n} trials)"})
