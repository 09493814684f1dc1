"""Trial tracking that survives an MLflow server going away mid-sweep.

A trial must never fail, nor lose a result, because the tracking server is
down. `JournalingTracker` writes through to MLflow while the server answers.
After the first failed call it stops trying (a call to a dead server can block
for minutes in MLflow's own retries) and appends every later call to
``unsynced.jsonl`` in the trial's folder (`TrialDir.journal`). The trial's results are on disk anyway
(``metrics.json``, ``config.yaml``, ``gallery/``).

The driver calls `sync_trials` before it builds the tables: at the end of every
``wsss sweep``, including a rerun of a finished sweep. It replays each journal
into the trial's run, then reconciles every run with the disk: a finished trial's
run gets its final metrics and files if it lacks them, and status FINISHED; a
diverged trial's run is FAILED. So when the server comes back, rerunning the same
``wsss sweep`` command logs what it missed without retraining anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import TRIAL_TAG, MlflowTracker, SweepTracking
from training.atomic import atomic_write_text
from training.trial_dir import TrialDir

log = logging.getLogger(__name__)

REPLAYED_TAG = "wsss.replayed_calls"
_CALLS = ("log_params", "log_metrics", "log_artifact", "set_tags")


class JournalingTracker:
    """A ``Tracker`` that never raises: MLflow while it answers, then a journal on disk.

    Args:
        tracker: the MLflow tracker of the trial's run.
        journal: the trial's ``unsynced.jsonl`` (`TrialDir.journal`; appended to, never truncated here).
        offline: start offline with this reason (no MLflow call is tried).
    """

    def __init__(self, tracker: MlflowTracker, journal: Path, *, offline: str | None = None) -> None:
        self.tracker = tracker
        self.journal = Path(journal)
        self.offline = offline

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags={k: str(v) for k, v in tags.items()})

    def set_status(self, status: str) -> None:
        """Reopen (RUNNING) or close the run; not journaled, `sync_trials` derives it from the disk."""
        if self.offline is None:
            self._try(lambda: self.tracker.set_status(status))

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        """What the run holds in MLflow; nothing while offline (the journal only records writes)."""
        listed: list[str] = []
        if self.offline is None:
            self._try(lambda: listed.extend(self.tracker.list_artifacts(artifact_path)))
        return listed

    def _call(self, name: str, **args: Any) -> None:
        if self.offline is None and self._try(lambda: getattr(self.tracker, name)(**args)):
            return
        with self.journal.open("a") as f:
            f.write(json.dumps({"call": name, **args}) + "\n")

    def _try(self, call) -> bool:
        try:
            call()
            return True
        except Exception as err:  # any tracking failure: the trial's results matter more
            self.offline = f"{type(err).__name__}: {err}"
            log.warning(
                "MLflow call failed (%s); this trial goes on and journals its tracking to %s. "
                "Rerun the same `wsss sweep` command when the server is back to log it.",
                self.offline.splitlines()[0][:300], self.journal,
            )  # fmt: skip
            return False


def replay(journal: Path, tracker: MlflowTracker) -> int:
    """Send a journal's calls to MLflow in order; returns how many were sent.

    Entries are removed as they are sent, so a replay cut short by another
    outage resumes where it stopped and never logs a metric point twice.

    Raises:
        Whatever MLflow raises when the server is still unreachable.
    """
    journal = Path(journal)
    if not journal.is_file():
        return 0
    entries = []
    for number, line in enumerate(journal.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut short when its trial was killed mid-write
            log.warning("%s:%d: unreadable journal line skipped", journal, number)
    for done, entry in enumerate(entries):
        call = entry.pop("call")
        if call not in _CALLS:
            raise ValueError(f"{journal}: unknown journal entry {call!r}; expected one of {', '.join(_CALLS)}")
        try:
            getattr(tracker, call)(**entry)
        except Exception:
            remaining = entries[done:]
            remaining[0] = {"call": call, **entry}
            atomic_write_text(journal, "".join(json.dumps(e) + "\n" for e in remaining))
            raise
    journal.unlink()
    return len(entries)


def sync_trials(sweep: SweepDir, tracking: SweepTracking, trials: dict[str, dict[str, Any]]) -> list[str]:
    """Make MLflow agree with the trials' folders (see the module docstring).

    Args:
        sweep: the sweep's folder.
        tracking: the sweep's MLflow runs.
        trials: the recorded trials (`SweepDir.load_trials`).

    Returns:
        The ids of the trials whose run was changed.
    """
    runs = {r.data.tags.get(TRIAL_TAG): r for r in tracking.child_runs()}
    changed = []
    for trial_id, record in trials.items():
        run = runs.get(trial_id)
        if run is not None and _sync_one(sweep.trial(trial_id), tracking, run, record):
            changed.append(trial_id)
    if changed:
        log.warning("logged to MLflow what %d trial(s) could not log while it was away: %s", len(changed), changed)
    return changed


def _sync_one(trial: TrialDir, tracking: SweepTracking, run, record: dict[str, Any]) -> bool:
    run_id = run.info.run_id
    tracker = tracking.tracker(run_id)
    sent = replay(trial.journal, tracker)
    if sent:
        previous = int(run.data.tags.get(REPLAYED_TAG, 0))
        tracker.set_tags({REPLAYED_TAG: str(previous + sent)})
        run = tracking.client.get_run(run_id)
    if trial.finished():
        final = {k: v for k, v in trial.read_metrics().items() if isinstance(v, int | float)}
        status = "FINISHED"
        missing = not set(final) <= set(run.data.metrics)
        if missing:
            tracker.log_metrics(final, step=record["config"]["train"]["epochs"])
        if missing or run.info.status != status:  # the trial's last calls may not have reached MLflow
            files = ((trial.config, None), (trial.metrics, None), (trial.gallery, trial.gallery.name))
            for path, artifact_path in files:
                if path.exists():
                    tracker.log_artifact(path, artifact_path)
            sent += 1
    elif trial.diverged.is_file():
        status = "FAILED"
    else:
        return bool(sent)
    if run.info.status != status:
        tracker.set_status(status)
        sent += 1
    return bool(sent)


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when its store is unreachable (HTTP errors, refused connections, a locked DB)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)
