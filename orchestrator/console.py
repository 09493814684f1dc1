"""What `wsss sweep` shows while it runs: one line per trial and a bar for the whole sweep.

The same content takes one of two forms, chosen by the stream it goes to:

- **live**, on a terminal: a small table (sweep bar, then a row per trial: id,
  status, epoch, loss, test mIoU, validation mIoU when there is a split, time)
  redrawn in place after every event;
- **log**, anywhere else (CI, ``ray job submit`` logs, a pipe): one plain line
  per event, each led by the sweep's bar, appended and never rewritten, with no
  terminal escape codes.

Progress goes to stderr, so stdout keeps only the results (tables, reading,
UI link). Pure: events in, text out; Ray's side of it is `tune_events`.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from training.tracker import Tracker

PENDING, RUNNING, DONE, STOPPED, FAILED, RETRYING = "pending", "running", "done", "stopped", "failed", "retrying"
_ORDER = {RUNNING: 0, RETRYING: 1, FAILED: 2, DONE: 3, STOPPED: 3, PENDING: 4}  # which rows a capped table keeps
_UP_AND_CLEAR = "\x1b[{n}F\x1b[J"  # cursor to the start of the line n lines up, clear to the end of the screen


@dataclass
class TrialRow:
    """What the console knows of one trial."""

    id: str
    epochs: int
    status: str = PENDING
    epoch: int = 0
    loss: float | None = None
    test_miou: float | None = None  # test_miou_1x: the per-epoch single-scale number
    val_miou: float | None = None  # val_miou_1x, when the trial holds out a validation split
    final_miou: float | None = None  # miou, once the trial finished
    note: str = ""
    started: float | None = None
    ended: float | None = None

    def update(self, metrics: dict[str, Any]) -> None:
        """Take what a report holds (an epoch's metrics, or the final ones)."""
        self.epoch = int(_number(metrics.get("epoch")) or self.epoch)
        self.loss = _number(metrics.get("loss"), self.loss)
        self.test_miou = _number(metrics.get("test_miou_1x"), self.test_miou)
        self.val_miou = _number(metrics.get("val_miou_1x"), self.val_miou)
        self.final_miou = _number(metrics.get("miou"), self.final_miou)

    @property
    def settled(self) -> bool:
        return self.status in (DONE, STOPPED, FAILED)


class SweepConsole:
    """The running sweep as a person reads it.

    Args:
        name: the sweep's name.
        trials: (trial id, epochs) of every trial, in the sweep's order; a trial
            reported under another id (a searcher's suggestion) joins at the end.
        stream: where it writes (default: stderr).
        live: redraw a table in place; default: when ``stream`` is a terminal
            (and ``TERM`` is not ``dumb``).
        clock: seconds, monotonic (tests pass a fake one).
        max_rows: rows of the live table; the rest are counted in one line.
    """

    def __init__(
        self,
        name: str,
        trials: Iterable[tuple[str, int]],
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_rows: int = 20,
    ) -> None:
        self.name = name
        self.rows = {trial_id: TrialRow(trial_id, epochs) for trial_id, epochs in trials}
        self.stream = stream or sys.stderr
        self.live = is_terminal(self.stream) if live is None else live
        self.clock = clock
        self.max_rows = max_rows
        self.start = clock()
        self._drawn = 0  # lines of the live table now on screen (0: draw the next one below)
        self._last_draw = -math.inf
        self._lock = threading.RLock()  # `say` may come from another thread (the driver's NodeWatch)

    # ---------------------------------------------------------------- before Tune

    def settled_earlier(self, trial_id: str, *, metrics: dict[str, Any] | None = None, reason: str = "") -> None:
        """A trial a previous run finished (``metrics``) or that diverged (``reason``): shown, never rerun."""
        row = self._row(trial_id)
        row.status, row.note = (DONE, "earlier") if metrics is not None else (FAILED, reason)
        if metrics is not None:
            row.update(metrics)
            row.epoch = row.epochs

    def say(self, line: str) -> None:
        """One line of the sweep's story (a teacher's epoch, the refinement, a lost node), outside the table."""
        with self._lock:
            self._lift()
            self._write(line + "\n")

    # ---------------------------------------------------------------- Tune's events

    def started(self, trial_id: str) -> None:
        row = self._row(trial_id)
        row.status, row.note = RUNNING, ""
        row.started = row.started or self.clock()
        self._event(row, "started")

    def reported(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """An epoch's metrics (the final report, with ``miou``, waits for `finished`)."""
        row = self._row(trial_id)
        row.status = RUNNING
        row.update(metrics)
        if "miou" not in metrics:
            self._event(row, f"epoch {row.epoch}/{row.epochs}")

    def finished(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """The trial ended without error: done with its final metrics, or stopped early by the scheduler."""
        row = self._row(trial_id)
        row.update(metrics)
        row.status = DONE if "miou" in metrics else STOPPED
        row.ended = self.clock()
        self._event(row, row.status)

    def failed(self, trial_id: str, reason: str, *, retrying: bool = False) -> None:
        row = self._row(trial_id)
        row.status, row.note = (RETRYING if retrying else FAILED), reason
        row.ended = None if retrying else self.clock()
        self._event(row, row.status)
        self._drawn = 0  # Tune prints its own lines about an error: leave them, draw below

    def opened(self) -> None:
        """Tune starts: a log says where the sweep stands (a terminal gets the table at the first tick)."""
        if not self.live:
            self._write(f"{self.bar(ascii=True)}  {self.name}: {self.counts()}\n")

    def tick(self) -> None:
        """Tune's loop turned: keep the live table's clock going (at most once a second)."""
        if self.live and self.clock() - self._last_draw >= 1.0:
            self._draw()

    def close(self) -> None:
        """Tune returned: the last table stays on screen; a log gets the sweep's closing line."""
        if self.live:
            self._draw()
            self._drawn = 0
        else:
            self._write(f"{self.bar(ascii=True)}  {self.name}: {self.counts()} · {duration(self.elapsed())}\n")

    # ---------------------------------------------------------------- rendering

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fraction(self) -> float:
        """How far the sweep is, in epochs (a settled trial counts whole)."""
        rows = list(self.rows.values())
        total = sum(max(r.epochs, 1) for r in rows)
        done = sum(max(r.epochs, 1) if r.settled else min(r.epoch, r.epochs) for r in rows)
        return done / total if total else 1.0

    def counts(self) -> str:
        """``2/4 trials done, 1 running, 1 pending`` (failures and early stops named when there are any)."""
        by = {s: sum(r.status == s for r in self.rows.values()) for s in _ORDER}
        parts = [f"{by[DONE]}/{len(self.rows)} trials done"]
        parts += [f"{by[s]} {s}" for s in (STOPPED, FAILED, RUNNING, RETRYING, PENDING) if by[s]]
        return ", ".join(parts)

    def bar(self, *, ascii: bool = False, width: int = 20) -> str:
        """The sweep's bar, e.g. ``[#####---------------]`` (ASCII) or ``▕█████···············▏``."""
        return progress_bar(self.fraction(), width=width, ascii=ascii)

    def table(self, width: int | None = None) -> list[str]:
        """The live table: the sweep line, a header and a row per trial (capped at ``max_rows``)."""
        head = f"sweep {self.name}  {self.bar()}  {self.counts()} · {duration(self.elapsed())}"
        position = {trial_id: i for i, trial_id in enumerate(self.rows)}
        rows = sorted(self.rows.values(), key=lambda r: _ORDER[r.status])  # stable: the sweep's order within
        shown = sorted(rows[: self.max_rows], key=lambda r: position[r.id])
        hidden = rows[self.max_rows :]
        cells = [self._cells(r) for r in shown]
        lines = [head, *_columns([self._header(), *cells])]
        if hidden:
            lines.append(f"  … and {len(hidden)} more ({_tally(hidden)})")
        return [_fit(line, width) for line in lines]

    def _header(self) -> list[str]:
        header = ["trial", "status", "epoch", "loss", "test mIoU"]
        return header + (["val mIoU"] if self._has_val() else []) + ["time", ""]

    def _cells(self, r: TrialRow) -> list[str]:
        cells = [r.id, r.status, f"{r.epoch}/{r.epochs}" if r.epoch else "", _fixed(r.loss), _pct(r.test_miou)]
        cells += [_pct(r.val_miou)] if self._has_val() else []
        note = f"miou {_pct(r.final_miou)}" if r.final_miou is not None and r.status == DONE else ""
        return [*cells, self._time(r), "  ".join(n for n in (note, r.note) if n)]

    def _has_val(self) -> bool:
        return any(r.val_miou is not None for r in self.rows.values())

    def _time(self, r: TrialRow) -> str:
        if r.started is None:
            return ""
        return duration((r.ended if r.ended is not None else self.clock()) - r.started)

    # ---------------------------------------------------------------- output

    def _row(self, trial_id: str) -> TrialRow:
        if trial_id not in self.rows:
            self.rows[trial_id] = TrialRow(trial_id, epochs=0)
        return self.rows[trial_id]

    def _event(self, row: TrialRow, what: str) -> None:
        if self.live:
            self._draw()
            return
        width = max(len(r.id) for r in self.rows.values())
        settled = sum(r.settled for r in self.rows.values())
        lead = f"{self.bar(ascii=True, width=10)} {settled}/{len(self.rows)}"
        self._write(f"{lead}  {row.id.ljust(width)}  {what}{self._detail(row)}\n")

    def _detail(self, r: TrialRow) -> str:
        """A log line's labelled numbers: what the live table shows in columns."""
        parts = [f"epoch {r.epoch}/{r.epochs}" if r.epoch and r.status != RUNNING else ""]
        parts += [f"loss {_fixed(r.loss)}" if r.loss is not None else ""]
        parts += [f"test mIoU {_pct(r.test_miou)}" if r.test_miou is not None else ""]
        parts += [f"val mIoU {_pct(r.val_miou)}" if r.val_miou is not None else ""]
        parts += [self._time(r) if r.epoch or r.settled else ""]
        parts += [f"miou {_pct(r.final_miou)}" if r.status == DONE and r.final_miou is not None else "", r.note]
        return "".join(f"  {p}" for p in parts if p)

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        text = "".join(line + "\n" for line in self.table(width))
        with self._lock:
            self._write((_UP_AND_CLEAR.format(n=self._drawn) if self._drawn else "") + text)
            self._drawn = text.count("\n")
            self._last_draw = self.clock()

    def _lift(self) -> None:
        """Leave the live table where it is; what comes next is written below it."""
        self._drawn = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# ---------------------------------------------------------------- the console Tune's callback forwards to

_ACTIVE: list[SweepConsole] = []


@contextmanager
def showing(console: SweepConsole) -> Iterator[SweepConsole]:
    """Make ``console`` the one Tune's events go to (`tune_events.ConsoleCallback`) while Tune runs.

    The callback finds it here rather than holding it, because Tune pickles its
    callbacks with the experiment and a restored sweep revives them: a revived
    callback must speak to this run's console, not a copy of the last one.
    """
    _ACTIVE.append(console)
    console.opened()
    try:
        yield console
    finally:
        _ACTIVE.remove(console)
        console.close()


def active() -> SweepConsole | None:
    """The console Tune's events go to now, or None (events are then dropped)."""
    return _ACTIVE[-1] if _ACTIVE else None


# ---------------------------------------------------------------- a run the driver trains itself


class EpochLines:
    """A `training.tracker.Tracker` that tells a run's epochs to the console in one short line each.

    For what the driver trains before any trial (a frozen teacher): everything
    still goes to ``inner`` (which keeps the run's ``events.jsonl``).

    Args:
        console: where the lines go.
        label: what is training, e.g. ``teacher resnet18``.
        epochs: how many epochs the run has.
        inner: the tracker that records the run (its printing is not shown).
    """

    def __init__(self, console: SweepConsole, label: str, epochs: int, inner: Tracker) -> None:
        self.console, self.label, self.epochs, self.inner = console, label, epochs, inner
        self._start = console.clock()

    def log_params(self, params: dict[str, Any]) -> None:
        self._start = self.console.clock()  # the run starts now (a cached one never does)
        self.console.say(f"{self.label}: training, {self.epochs} epochs")
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "miou" in metrics:
            took = duration(self.console.clock() - self._start)
            self.console.say(f"{self.label}: done in {took}  miou {_pct(metrics['miou'])}  "
                             f"accuracy {_pct(metrics.get('accuracy'))}")  # fmt: skip
        else:
            loss, test = _fixed(_number(metrics.get("loss"))), _pct(_number(metrics.get("test_miou_1x")))
            self.console.say(f"{self.label}: epoch {step}/{self.epochs}  loss {loss}  test mIoU {test}")
        self.inner.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.inner.set_tags(tags)

    def set_status(self, status: str) -> None:
        self.inner.set_status(status)

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        return self.inner.list_artifacts(artifact_path)


# ---------------------------------------------------------------- pure helpers


def is_terminal(stream: TextIO) -> bool:
    """True for an interactive terminal that understands cursor movement."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def progress_bar(fraction: float, *, width: int = 20, ascii: bool = False) -> str:
    """A bar ``width`` cells wide, filled to ``fraction`` (clipped to [0, 1], rounded down).

    >>> progress_bar(0.5, width=10, ascii=True)
    '[#####-----]'
    """
    filled = int(max(0.0, min(1.0, fraction)) * width + 1e-9)
    if ascii:
        return f"[{'#' * filled}{'-' * (width - filled)}]"
    return f"▕{'█' * filled}{'·' * (width - filled)}▏"


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart (no trailing blanks)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _tally(rows: list[TrialRow]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _fit(line: str, width: int | None) -> str:
    """Cut a line to the terminal's width, so it never wraps (a wrapped line breaks the redraw)."""
    return line if width is None or len(line) < width else line[: max(width - 2, 1)] + "…"


def _number(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return default
    return float(value)


def _fixed(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
