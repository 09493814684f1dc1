"""The sweep's console (`orchestrator.console`): what a person reads while a sweep runs.

Events are fed by hand with a fake clock, so every line below is worked out
exactly. The Tune side (`orchestrator.tune_events`) is checked with stand-in
trial objects; a real sweep's console is checked in test_sweep_e2e.py.
"""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import pytest
import yaml
from conftest import tiny_config_dict

from orchestrator.console import EpochLines, SweepConsole, active, progress_bar, showing
from training.tracker import RecordingTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _console(trials, *, live=False, **kwargs):
    out, clock = io.StringIO(), Clock()
    return SweepConsole("quick", trials, stream=out, live=live, clock=clock, **kwargs), out, clock


@pytest.mark.parametrize(
    ("fraction", "ascii", "expected"),
    [
        (0.0, True, "[----------]"),
        (0.5, True, "[#####-----]"),
        (0.99, True, "[#########-]"),  # rounded down: full only when done
        (1.0, True, "[##########]"),
        (1.7, True, "[##########]"),  # clipped
        (-0.2, True, "[----------]"),
        (0.3, False, "▕███·······▏"),
    ],
)
def test_progress_bar_fills_by_fraction(fraction, ascii, expected):
    assert progress_bar(fraction, width=10, ascii=ascii) == expected


def test_a_log_gets_one_plain_line_per_event():
    """Two trials of 2 epochs: progress counts epochs (a settled trial counts whole), 4 in all."""
    console, out, clock = _console([("000-ts", 2), ("001-baseline", 2)])
    with showing(console):
        console.started("000-ts")
        clock.now = 30
        console.reported("000-ts", {"epoch": 1, "loss": 0.61234, "test_miou_1x": 0.0768, "training_iteration": 1})
        console.started("001-baseline")
        clock.now = 75
        final = {"epoch": 2, "loss": 0.5, "test_miou_1x": 0.081, "miou": 0.087, "accuracy": 0.55}
        console.reported("000-ts", final)  # the final report: shown once, by `finished`
        console.finished("000-ts", final)
        clock.now = 80
        console.failed("001-baseline", "TrainingDiverged: loss is not finite at epoch 1, step 2")
    assert out.getvalue().splitlines() == [
        "[--------------------]  quick: 0/2 trials done, 2 pending",
        "[----------] 0/2  000-ts        started",
        "[##--------] 0/2  000-ts        epoch 1/2  loss 0.612  test mIoU 7.7%  30s",  # 1 of 4 epochs: 2.5 cells
        "[##--------] 0/2  001-baseline  started",
        "[#####-----] 1/2  000-ts        done  epoch 2/2  loss 0.500  test mIoU 8.1%  1m15s  miou 8.7%",
        "[##########] 2/2  001-baseline  failed  50s  TrainingDiverged: loss is not finite at epoch 1, step 2",
        "[####################]  quick: 1/2 trials done, 1 failed · 1m20s",
    ]
    assert "\x1b" not in out.getvalue()  # no escape codes where nobody reads a terminal


def test_a_terminal_gets_a_table_redrawn_in_place():
    console, out, clock = _console([("000-ts", 4), ("001-co", 4)], live=True)
    console.started("000-ts")
    first = out.getvalue()
    assert "\x1b" not in first and len(first.splitlines()) == 4  # sweep line, header, two rows
    clock.now = 12
    console.reported("000-ts", {"epoch": 1, "loss": 1.5, "test_miou_1x": 0.05})
    redraw = out.getvalue()[len(first) :]
    assert redraw.startswith("\x1b[4F\x1b[J")  # up the 4 lines drawn, cleared, drawn again
    assert redraw.splitlines()[2].split() == ["000-ts", "running", "1/4", "1.500", "5.0%", "12s"]
    console.failed("001-co", "boom")  # Tune prints its own lines about an error next:
    at = len(out.getvalue())
    clock.now = 20
    console.tick()  # the next table goes below them, nothing is erased
    assert out.getvalue()[at:].startswith("sweep quick")


def test_the_validation_column_appears_with_a_validation_split():
    console, _, _ = _console([("000-a", 2), ("001-b", 2)])
    assert "val mIoU" not in console.table()[1]
    console.reported("001-b", {"epoch": 1, "loss": 0.7, "test_miou_1x": 0.1, "val_miou_1x": 0.125})
    header, _, row_b = console.table()[1:]
    assert header.split() == ["trial", "status", "epoch", "loss", "test", "mIoU", "val", "mIoU", "time"]
    assert row_b.split() == ["001-b", "running", "1/2", "0.700", "10.0%", "12.5%"]  # never started: no time


def test_a_long_sweep_keeps_the_live_table_short():
    trials = [(f"{i:03d}-t", 1) for i in range(30)]
    console, _, _ = _console(trials, max_rows=5)
    console.finished("000-t", {"epoch": 1, "miou": 0.5})
    for i in (7, 9):
        console.started(f"{i:03d}-t")
    lines = console.table()
    assert len(lines) == 1 + 1 + 5 + 1  # sweep line, header, 5 rows, the rest counted
    assert [line.split()[0] for line in lines[2:7]] == ["000-t", "001-t", "002-t", "007-t", "009-t"]
    assert lines[-1] == "  … and 25 more (25 pending)"
    assert all(len(line) <= 40 for line in console.table(width=40))  # never wraps on a narrow terminal


def test_early_stopped_and_earlier_trials_are_told_apart():
    console, _, _ = _console([("000-a", 4), ("001-b", 4), ("002-c", 4)])
    console.settled_earlier("000-a", metrics={"miou": 0.2, "accuracy": 0.9})
    console.settled_earlier("001-b", reason="loss is not finite at epoch 1, step 2")
    console.started("002-c")
    console.reported("002-c", {"epoch": 1, "loss": 0.9})
    console.finished("002-c", {"epoch": 1, "loss": 0.9})  # ASHA stopped it: no final metrics
    assert console.counts() == "1/3 trials done, 1 stopped, 1 failed"
    assert console.fraction() == 1.0
    rows = {line.split()[0]: line.split()[1:] for line in console.table()[2:]}
    assert rows["000-a"] == ["done", "4/4", "miou", "20.0%", "earlier"]
    assert rows["001-b"][:2] == ["failed", "loss"]


def test_a_trial_the_console_was_not_told_of_joins_the_table():
    console, _, _ = _console([("000-a", 2)])
    console.started("007-suggested")
    assert [line.split()[0] for line in console.table()[2:]] == ["000-a", "007-suggested"]


def test_epoch_lines_tell_a_teacher_run_and_record_everything():
    console, out, clock = _console([])
    inner = RecordingTracker()
    lines = EpochLines(console, "teacher resnet18", 2, inner)
    lines.log_params({"name": "teacher"})
    clock.now = 20
    lines.log_metrics({"loss": 0.68, "test_miou_1x": 0.0768, "epoch": 1}, step=1)
    clock.now = 41
    lines.log_metrics({"miou": 0.0284, "accuracy": 0.68}, step=2)
    lines.set_status("FINISHED")
    assert out.getvalue().splitlines() == [
        "teacher resnet18: training, 2 epochs",
        "teacher resnet18: epoch 1/2  loss 0.680  test mIoU 7.7%",
        "teacher resnet18: done in 41s  miou 2.8%  accuracy 68.0%",
    ]
    assert inner.params == {"name": "teacher"} and len(inner.metrics) == 2 and inner.statuses == ["FINISHED"]


# ---------------------------------------------------------------- Tune's side


def _trial(trial_id: str, tmp_path=None, error: str | None = None, last_result=None):
    error_file = None
    if error is not None:
        error_file = tmp_path / "error.txt"
        error_file.write_text(f"Failure # 1\nTraceback (most recent call last):\n  ...\n{error}\n\n")
    return SimpleNamespace(config={"trial": {"trial_id": trial_id}}, last_result=last_result, error_file=error_file)


def test_the_callback_speaks_to_the_active_console_even_after_tune_pickled_it(tmp_path):
    """Tune pickles its callbacks with the experiment and revives them on restore."""
    from orchestrator.tune_events import ConsoleCallback

    revived = pickle.loads(pickle.dumps(ConsoleCallback()))
    revived.on_trial_start(iteration=1, trials=[], trial=_trial("000-a"))  # no console: dropped
    console, out, _ = _console([("000-a", 2), ("001-b", 2)])
    with showing(console):
        assert active() is console
        revived.on_trial_start(iteration=1, trials=[], trial=_trial("000-a"))
        revived.on_trial_result(iteration=2, trials=[], trial=_trial("000-a"), result={"epoch": 1, "loss": 0.5})
        done = {"epoch": 2, "loss": 0.4, "miou": 0.3}
        revived.on_trial_complete(iteration=3, trials=[], trial=_trial("000-a", last_result=done))
        crash = _trial("001-b", tmp_path, error="RuntimeError: injected crash after epoch 1")
        revived.on_trial_recover(iteration=4, trials=[], trial=crash)
        assert console.rows["001-b"].status == "retrying"
        revived.on_trial_error(iteration=5, trials=[], trial=crash)
    assert active() is None
    assert console.rows["000-a"].status == "done" and console.rows["000-a"].final_miou == 0.3
    assert console.rows["001-b"].note == "RuntimeError: injected crash after epoch 1"
    assert out.getvalue().count("\n") == 1 + 5 + 1  # opened, five events, closed


def test_error_line_without_a_file_says_where_to_look(tmp_path):
    from orchestrator.tune_events import error_line

    assert error_line(_trial("000-a")) == "see Tune's error file"
    assert error_line(_trial("000-a", tmp_path, error="x" * 300), limit=20) == "x" * 19 + "…"


# ---------------------------------------------------------------- the driver's console


def test_the_sweep_console_starts_from_what_is_on_disk(tmp_path):
    from orchestrator.driver import sweep_console
    from orchestrator.space import expand, load_space
    from orchestrator.sweep_dir import SweepDir

    path = tmp_path / "lam.yaml"
    body = {"name": "lam", "base": tiny_config_dict(), "grid": {"transfer.lam": [0.5, 1.0, 2.0]}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    space = load_space(path)
    trials = expand(space)
    sweep = SweepDir.of(tmp_path / "runs", "lam")
    sweep.record(space, trials)
    done, nan, _ = (sweep.trial(t.id) for t in trials)
    done.create().write_metrics({"miou": 0.25})
    nan.create().mark_diverged("loss is not finite at epoch 1, step 2")
    console = sweep_console("lam", trials, sweep)
    assert [(r.status, r.epochs) for r in console.rows.values()] == [("done", 2), ("failed", 2), ("pending", 2)]
    assert console.rows[trials[1].id].note == "loss is not finite at epoch 1, step 2"


def test_a_silent_console_tracker_still_keeps_the_runs_events(tmp_path, capsys):
    """What `EpochLines` wraps for a teacher: the events on disk, nothing printed beside the console's lines."""
    from training.tracker import ConsoleTracker, Tracker

    silent = ConsoleTracker(tmp_path, stream=None)
    silent.log_metrics({"loss": 0.5}, step=1)
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "events.jsonl").read_text().splitlines() == ['{"step": 1, "metrics": {"loss": 0.5}}']
    console, _, _ = _console([])
    assert isinstance(EpochLines(console, "teacher", 1, silent), Tracker)  # the whole protocol
