"""The logging interface a trial writes through.

`training/` never imports MLflow: the orchestrator passes an MLflow-backed
implementation, tests pass `RecordingTracker`, and `wsss trial` uses
`ConsoleTracker`, which prints and appends JSON lines to a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

from training.trial_dir import TrialDir


class Tracker(Protocol):
    """What a trial reports: flat params once, metrics per step, files, tags."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class RecordingTracker:
    """Keeps everything in memory; for tests and for batching before a flush."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def last(self, name: str) -> float | None:
        """The most recent value logged for metric ``name``."""
        for _, metrics in reversed(self.metrics):
            if name in metrics:
                return metrics[name]
        return None


class ConsoleTracker:
    """Prints metrics and appends every event to ``events.jsonl`` in ``out_dir``."""

    def __init__(self, out_dir: Path | None = None, *, stream=sys.stdout) -> None:
        self.stream = stream
        self.path = TrialDir(out_dir).events if out_dir else None

    def _write(self, event: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(event, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        prefix = f"[step {step}] " if step is not None else ""
        print(prefix + shown, file=self.stream, flush=True)
        self._write({"step": step, "metrics": metrics})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._write({"artifact": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"tags": tags})
