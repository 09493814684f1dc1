"""The logging interface a trial, and a sweep's parent run, write through.

`training/` never imports MLflow: the orchestrator passes an MLflow-backed
implementation (one per run: a trial's, or the sweep's parent run), tests pass
`RecordingTracker`, and `wsss trial` uses `ConsoleTracker`, which prints and
appends JSON lines to a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from training.errors import ConfigError
from training.trial_dir import TrialDir

RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    """What a run records: flat params once, metrics per step, files, tags, and how it ended."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file, or every file below a folder, under ``artifact_path``."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def set_status(self, status: str) -> None:
        """Reopen the run (RUNNING) or end it (FINISHED, FAILED, KILLED)."""

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        """The artifact paths logged directly under ``artifact_path`` (e.g. ``plots/metric.png``)."""


def _check_status(status: str) -> str:
    if status not in RUN_STATUSES:
        raise ConfigError(f"run status {status!r}; expected one of {', '.join(RUN_STATUSES)}")
    return status


def _artifact_files(path: Path, artifact_path: str | None) -> list[tuple[Path, str]]:
    """(file, artifact path it lands at) for a file, or for every file below a folder."""
    path = Path(path)
    prefix = f"{artifact_path}/" if artifact_path else ""
    if not path.is_dir():
        return [(path, prefix + path.name)]
    return [(f, prefix + f.relative_to(path).as_posix()) for f in sorted(path.rglob("*")) if f.is_file()]


def _listed(logged: list[str], artifact_path: str | None) -> list[str]:
    """What an artifact store lists under a folder: its files and its subfolders, once each."""
    prefix = f"{artifact_path.rstrip('/')}/" if artifact_path else ""
    children = {prefix + name[len(prefix):].split("/", 1)[0] for name in logged if name.startswith(prefix)}
    return sorted(children)


class RecordingTracker:
    """Keeps everything in memory; for tests and for batching before a flush."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tags: dict[str, str] = {}
        self.statuses: list[str] = []
        self.logged: list[str] = []  # artifact paths, as an artifact store would hold them

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))
        self.logged += [name for _, name in _artifact_files(path, artifact_path) if name not in self.logged]

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def set_status(self, status: str) -> None:
        self.statuses.append(_check_status(status))

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        return _listed(self.logged, artifact_path)


class ConsoleTracker:
    """Prints metrics to ``stream`` (None: prints nothing) and appends every event to
    ``events.jsonl`` in ``out_dir``."""

    def __init__(self, out_dir: Path | None = None, *, stream=sys.stdout) -> None:
        self.stream = stream
        self.path = TrialDir(out_dir).events if out_dir else None
        self._logged: list[str] = []

    def _write(self, event: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(event, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.stream is not None:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            prefix = f"[step {step}] " if step is not None else ""
            print(prefix + shown, file=self.stream, flush=True)
        self._write({"step": step, "metrics": metrics})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._logged += [name for _, name in _artifact_files(path, artifact_path)]
        self._write({"artifact": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"tags": tags})

    def set_status(self, status: str) -> None:
        self._write({"status": _check_status(status)})

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        return _listed(self._logged, artifact_path)
