"""Ray Tune's trial events, told to the sweep's console (`orchestrator.console`).

Tune's own reporter prints every trial's whole config as a table and a status
table every 30 s. The sweep runs Tune silent and gets the events through a
callback instead: since Ray 2.6 Tune ignores a custom ``progress_reporter``
(ray-project/ray#38202), and callbacks are the supported way. The callback
holds nothing: Tune pickles it with the experiment, and a restored sweep's
revived copy speaks to the console of the run at hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator import console


def trial_id(trial) -> str:
    """Our id of a Tune trial (its config carries it, `tuner.trial_param`)."""
    return trial.config["trial"]["trial_id"]


class ConsoleCallback(tune.Callback):
    """Forwards trial starts, results, ends, errors and retries to `console.active()`."""

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if (c := console.active()) is not None:
            c.started(trial_id(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        if (c := console.active()) is not None:
            c.reported(trial_id(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if (c := console.active()) is not None:
            c.finished(trial_id(trial), trial.last_result or {})

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        if (c := console.active()) is not None:
            c.failed(trial_id(trial), error_line(trial), retrying=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        if (c := console.active()) is not None:
            c.failed(trial_id(trial), error_line(trial))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if (c := console.active()) is not None:
            c.tick()


def error_line(trial, limit: int = 160) -> str:
    """The last line of the trial's error file (the exception and its message), cut to ``limit``."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    last = lines[-1] if lines else "see Tune's error file"
    return last if len(last) <= limit else last[: limit - 1] + "…"


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


@contextmanager
def tune_output(verbose: bool) -> Iterator[None]:
    """Tune's own console output while ``fit`` runs: its usual tables if ``verbose``, else none.

    ``RunConfig(verbose=0)`` alone is not silent: Tune's default output engine (Ray ≥ 2.6)
    still prints an experiment box, the TensorBoard hint, a final status table and a
    result table per failed trial (about 20 lines for a sweep). Its legacy engine,
    chosen by ``RAY_AIR_NEW_OUTPUT=0``, prints nothing at verbose 0; errors still
    reach the log through Tune's logger. The variable is set only for the call, and a
    value the user set is kept.
    """
    if verbose or NEW_OUTPUT_ENV in os.environ:
        yield
        return
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(NEW_OUTPUT_ENV, None)
