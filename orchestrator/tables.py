"""Results tables and plots of a sweep, shaped like the thesis's tables.

Input everywhere is a list of per-trial result rows with flat keys, e.g.
``{"trial_id": "a1", "transfer.paradigm": "teacher_student",
"transfer.metric": "cosine", "transfer.level": "global", "transfer.lam": 1.0,
"miou": 0.4737}``. Tables and plots are logged as plain files on the sweep's
parent run (``tables/``, ``plots/``); plain files overwrite on a second
logging, whereas ``mlflow.log_table`` would append rows to the old file.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.tracking import SweepTracking
from training.config.sweep import TableSpec
from training.tracker import Tracker

MISSING = "—"
DEFAULT_METRICS = ("miou", "miou_per_image", "accuracy", "context_activation")


@dataclass(frozen=True)
class Cell:
    """Aggregate of the trials falling in one cell (already scaled)."""

    mean: float
    count: int
    sd: float = 0.0  # sample standard deviation (n − 1); 0 for one trial


@dataclass(frozen=True)
class Pivot:
    """A pivot table: ``cells[(row_key, col_key)]``; absent cells had no trial."""

    spec: TableSpec
    row_keys: tuple[tuple, ...]
    col_keys: tuple[tuple, ...]
    cells: Mapping[tuple[tuple, tuple], Cell]

    def text(self, row_key: tuple, col_key: tuple) -> str:
        """The cell as shown: formatted mean, ``± sd (n=k)`` when k>1 trials (seeds), or ``—``."""
        cell = self.cells.get((row_key, col_key))
        if cell is None:
            return MISSING
        shown = self.spec.fmt.format(cell.mean)
        return shown if cell.count == 1 else f"{shown} ± {self.spec.fmt.format(cell.sd)} (n={cell.count})"

    def column_labels(self) -> list[str]:
        """Column headers: the column fields' values joined by spaces."""
        return [" ".join(_label(v) for v in key) for key in self.col_keys]


def _label(value: Any) -> str:
    return MISSING if value is None else str(value)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, text, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sort_key(values: tuple) -> tuple:
    """Numbers numerically (λ 0.3 < 1.0 < 1.3), then text, then missing."""
    out = []
    for v in values:
        n = _number(v)
        out.append((0, n, "") if n is not None else (1 if v is not None else 2, 0.0, str(v)))
    return tuple(out)


def pivot(rows: Iterable[Mapping[str, Any]], spec: TableSpec) -> Pivot:
    """Average ``spec.value`` over trials sharing a row and column key (mean and sample sd).

    Rows without a numeric ``spec.value`` (failed trials) are skipped; a missing
    row/column field counts as its own value, shown ``—``.

    Args:
        rows: per-trial result rows with flat keys.
        spec: which fields make rows, columns and the value.
    """
    sums: dict[tuple[tuple, tuple], list[float]] = defaultdict(list)
    for row in rows:
        value = _number(row.get(spec.value))
        if value is None:
            continue
        row_key = tuple(row.get(k) for k in spec.rows)
        col_key = tuple(row.get(k) for k in spec.columns)
        sums[(row_key, col_key)].append(value * spec.scale)
    cells = {key: _cell(vs) for key, vs in sums.items()}
    row_keys = tuple(sorted({r for r, _ in cells}, key=_sort_key))
    col_keys = tuple(sorted({c for _, c in cells}, key=_sort_key))
    return Pivot(spec, row_keys, col_keys, cells)


def _cell(values: list[float]) -> Cell:
    mean = sum(values) / len(values)
    spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return Cell(mean, len(values), math.sqrt(spread))


def _markdown(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buffer.getvalue()


def to_markdown(table: Pivot) -> str:
    """The pivot as a GitHub-markdown table (first column: the row fields)."""
    header = [" / ".join(table.spec.rows), *table.column_labels()]
    body = [
        [" ".join(_label(v) for v in rk), *(table.text(rk, ck) for ck in table.col_keys)]
        for rk in table.row_keys
    ]
    return _markdown(header, body)


def to_csv(table: Pivot) -> str:
    """The pivot as CSV: one column per row field, then one per column key; empty = missing."""
    header = [*table.spec.rows, *table.column_labels()]
    body = []
    for rk in table.row_keys:
        cells = [table.cells.get((rk, ck)) for ck in table.col_keys]
        values = ["" if c is None else table.spec.fmt.format(c.mean) for c in cells]
        body.append([("" if v is None else str(v)) for v in rk] + values)
    return _csv(header, body)


def _flat_text(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_table(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], *, sort_by: str = "miou"
) -> tuple[str, str]:
    """The flat per-trial table, best ``sort_by`` first (trials without it last).

    Args:
        rows: per-trial result rows.
        columns: result keys to show, in order.
        sort_by: result key to sort by, descending.

    Returns:
        (markdown, csv). Markdown shows floats with 4 decimals and ``—`` for
        missing values; CSV keeps full precision and leaves missing cells empty.
    """
    def order(row: Mapping[str, Any]) -> tuple[bool, float]:
        value = _number(row.get(sort_by))
        return (value is None, -(value or 0.0))

    ordered = sorted(rows, key=order)
    md = _markdown(columns, ([_flat_text(r.get(c)) for c in columns] for r in ordered))
    text = _csv(columns, ([("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in ordered))
    return md, text


def new_figure(width: float, height: float):
    """A ``width``×``height`` inch matplotlib Figure at 100 dpi, for every plot the sweep logs.

    Built without pyplot: no global state and no GUI backend inside Ray workers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def lambda_curves(
    rows: Iterable[Mapping[str, Any]], *, value: str, group_by: Sequence[str], lam_key: str = "transfer.lam"
) -> dict[tuple, list[tuple[float, float]]]:
    """``value`` averaged per λ for each group: {group values: [(λ, mean), ...] sorted by λ}."""
    points: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        lam, y = _number(row.get(lam_key)), _number(row.get(value))
        if lam is not None and y is not None:
            points[tuple(row.get(k) for k in group_by)][lam].append(y)
    return {
        group: [(lam, sum(ys) / len(ys)) for lam, ys in sorted(by_lam.items())]
        for group, by_lam in sorted(points.items(), key=lambda item: _sort_key(item[0]))
    }


def plot_lambda(
    rows: Iterable[Mapping[str, Any]],
    *,
    value: str = "miou",
    group_by: Sequence[str] = ("transfer.paradigm", "transfer.metric", "transfer.level"),
    out: Path,
    scale: float = 100.0,
) -> Path:
    """Plot ``value`` (×``scale``) against λ (``transfer.lam``), one line per group.

    Returns:
        ``out``, a PNG file.
    """
    curves = lambda_curves(rows, value=value, group_by=group_by)
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    for group, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o",
                label=" ".join(_label(v) for v in group))
    if curves:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no trials with λ and a value", ha="center", transform=ax.transAxes)
    ax.set_xlabel("λ (transfer loss weight)")
    ax.set_ylabel({1.0: value, 100.0: f"{value} (%)"}.get(scale, f"{value} ×{scale:g}"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_heatmap(table: Pivot, out: Path) -> Path:
    """Heatmap of a pivot, each cell annotated with its text (``—`` when missing).

    Returns:
        ``out``, a PNG file.
    """
    import numpy as np

    grid = np.full((len(table.row_keys), len(table.col_keys)), np.nan)
    for i, rk in enumerate(table.row_keys):
        for j, ck in enumerate(table.col_keys):
            cell = table.cells.get((rk, ck))
            if cell is not None:
                grid[i, j] = cell.mean
    title = f"{table.spec.name}: {table.spec.value}"
    # Wide enough for the title too (a one-column table would clip it).
    fig = new_figure(max(1.6 + 1.3 * max(1, grid.shape[1]), 1.2 + 0.09 * len(title)), 1.2 + 0.6 * max(1, grid.shape[0]))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    for i, rk in enumerate(table.row_keys):
        for j, ck in enumerate(table.col_keys):
            ax.text(j, i, table.text(rk, ck), ha="center", va="center", fontsize="small",
                    color="black", bbox={"facecolor": "white", "alpha": 0.6, "lw": 0})
    ax.set_xticks(range(len(table.col_keys)), table.column_labels(), rotation=30, ha="right")
    ax.set_yticks(range(len(table.row_keys)), [" ".join(_label(v) for v in rk) for rk in table.row_keys])
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def default_result_columns(rows: Sequence[Mapping[str, Any]], specs: Sequence[TableSpec]) -> list[str]:
    """``trial_id``, the fields the specs group by, then the known metrics present."""
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    wanted = ["trial_id"]
    for spec in specs:
        wanted += [*spec.rows, *spec.columns]
    wanted += ["transfer.lam", *DEFAULT_METRICS]
    return [c for c in dict.fromkeys(wanted) if c in present]


def write_tables(
    folder: Path,
    rows: Sequence[Mapping[str, Any]],
    specs: Sequence[TableSpec],
    *,
    columns: Sequence[str] | None = None,
) -> dict[str, str]:
    """Write ``tables/*.md|csv`` and ``plots/*.png`` under ``folder``.

    Returns:
        {table name: markdown}; the flat per-trial table is ``"results"``.
    """
    tables, plots = Path(folder) / "tables", Path(folder) / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    for spec in specs:
        table = pivot(rows, spec)
        texts[spec.name] = to_markdown(table)
        (tables / f"{spec.name}.md").write_text(texts[spec.name])
        (tables / f"{spec.name}.csv").write_text(to_csv(table))
        plot_heatmap(table, plots / f"{spec.name}.png")
    md, text = results_table(rows, list(columns or default_result_columns(rows, specs)))
    texts["results"] = md
    (tables / "results.md").write_text(md)
    (tables / "results.csv").write_text(text)
    if any(_number(r.get("transfer.lam")) is not None for r in rows):
        plot_lambda(rows, out=plots / "lambda.png")
    return texts


def log_tables(
    parent: Tracker,
    rows: Sequence[Mapping[str, Any]],
    specs: Sequence[TableSpec],
    *,
    columns: Sequence[str] | None = None,
) -> dict[str, str]:
    """Write the tables and plots and log them on the sweep's parent run.

    Files keep their names between calls, so logging again replaces content
    instead of adding copies.

    Args:
        parent: the tracker of the sweep's parent run, which receives ``tables/`` and ``plots/``.
        rows: per-trial result rows.
        specs: pivot tables to build.
        columns: columns of the flat results table (default: see ``default_result_columns``).

    Returns:
        {table name: markdown}, for the CLI to print.
    """
    with tempfile.TemporaryDirectory() as tmp:
        texts = write_tables(Path(tmp), rows, specs, columns=columns)
        for sub in ("tables", "plots"):
            parent.log_artifact(Path(tmp) / sub, sub)
    return texts


def read_tables(tracking_uri: str, sweep_name: str, experiment: str | None = None) -> dict[str, str]:
    """Download the markdown tables logged on a sweep's parent run.

    Returns:
        {table name: markdown}; empty when no tables were logged yet.

    Raises:
        ConfigError: no sweep of that name exists in the store.
    """
    parent = SweepTracking.find(tracking_uri, sweep_name, experiment).parent
    names = [name for name in parent.list_artifacts("tables") if name.endswith(".md")]
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(names):
            texts[Path(name).stem] = parent.download_artifact(name, Path(tmp)).read_text()
    return texts
