"""The folder of one trial: its layout, and the reads and atomic writes of its files.

Every module that touches a trial's folder names its files through `TrialDir`,
so the layout is written down once, here::

    <trial>/config.yaml           the resolved config (``wsss trial`` reads it back)
    <trial>/metrics.json          the final metrics; written last, so a trial that has it finished
    <trial>/checkpoint/state.pt   model, optimiser, schedule and epoch count, to resume from
    <trial>/cams/                 the test split's CAM shards and their index (`training.shards`)
    <trial>/val_cams/             the validation split's, when the trial holds one out
    <trial>/gallery/*.png         CAM overlays
    <trial>/events.jsonl          what a trial run without MLflow logged (`ConsoleTracker`)
    <trial>/diverged.json         why a diverged trial stopped; it is never retried
    <trial>/stopped.json          the epoch an early-stopping scheduler (ASHA) stopped it at; settled, never rerun
    <trial>/unsynced.jsonl        tracking calls MLflow missed, replayed later (`orchestrator.offline`)
    <trial>/refine/<pipeline>/    refined masks and IoU counts (`orchestrator.refine_actors`)

A teacher's and a pre-training run's folders share the run part of this layout
(``checkpoint/``, ``metrics.json``, ``events.jsonl``). No torch here: the
orchestrator reads trial folders without building models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.atomic import atomic_write_json

STATE_FILE = "state.pt"  # inside any checkpoint folder (`training.loop.save_state`), wherever Tune moves it
EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class TrialDir:
    """One trial's folder (see the module docstring for what each file holds).

    Attributes:
        path: the folder, ``<storage>/<sweep>/trials/<id>`` in a sweep.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def id(self) -> str:
        """The trial id: the folder's name."""
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def state(self) -> Path:
        return self.checkpoint / STATE_FILE

    @property
    def cams(self) -> Path:
        return self.path / "cams"

    @property
    def val_cams(self) -> Path:
        return self.path / "val_cams"

    @property
    def gallery(self) -> Path:
        return self.path / "gallery"

    @property
    def events(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def diverged(self) -> Path:
        return self.path / "diverged.json"

    @property
    def stopped(self) -> Path:
        return self.path / "stopped.json"

    @property
    def journal(self) -> Path:
        return self.path / "unsynced.jsonl"

    @property
    def refine(self) -> Path:
        return self.path / "refine"

    def create(self) -> TrialDir:
        """Make the folder (and its parents) if missing; returns self."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def finished(self) -> bool:
        """True once the final metrics are written (the last thing a trial writes)."""
        return self.metrics.is_file()

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.metrics, metrics, sort_keys=True)

    def diverged_reason(self) -> str | None:
        """Why the trial diverged, or None when it did not."""
        return json.loads(self.diverged.read_text())["reason"] if self.diverged.is_file() else None

    def mark_diverged(self, reason: str) -> None:
        atomic_write_json(self.diverged, {"reason": reason}, indent=None)

    def stopped_reason(self) -> str | None:
        """Why a scheduler stopped the trial early, or None when it did not."""
        return json.loads(self.stopped.read_text())["reason"] if self.stopped.is_file() else None

    def mark_stopped(self, reason: str, *, epoch: int) -> None:
        atomic_write_json(self.stopped, {"reason": reason, "epoch": epoch}, indent=None)
