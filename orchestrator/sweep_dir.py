"""The storage folder of one sweep: its layout, and the reads and atomic writes of its files.

Every module that touches a sweep's folder names its files through `SweepDir`,
so the layout is written down once, here::

    <storage>/<name>/space.yaml      the sweep file as given, its base resolved (rebuilds the space)
    <storage>/<name>/trials.json     the expanded trials: id → overrides, resolved config, run name
    <storage>/<name>/trials/<id>/    each trial's folder (`training.trial_dir.TrialDir`)
    <storage>/<name>/teachers/       frozen teachers, pinned here for teacher_student trials
    <storage>/<name>/tune/           Ray Tune's own experiment state (restored on rerun)
    <storage>/<name>/refine.json     the last complete refinement: its section, trials, tables, nodes
    <storage>/<name>/reruns/<id>.yaml  a trial's config as written for ``wsss trial --from-sweep``
    <storage>/<name>/done.json       written when every trial has finished

What a trial's state is (finished, diverged, still to run) is read from the
disk, never from Tune or MLflow: the folder is the record that survives them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.space import SearchSpace, TrialSpec, arm
from orchestrator.tracking import flatten
from training.atomic import atomic_write_json, atomic_write_text
from training.config import TrialConfig, from_dict
from training.errors import ConfigError
from training.trial_dir import TrialDir


@dataclass(frozen=True)
class SweepStatus:
    """Where a sweep's trials stand on disk."""

    finished: list[str]  # trial ids with metrics.json
    failed: list[str]  # diverged: never retried, they would diverge again
    total: int

    @property
    def settled(self) -> bool:
        """Nothing is left to run: every trial finished or diverged."""
        return len(self.finished) + len(self.failed) == self.total

    @property
    def complete(self) -> bool:
        return len(self.finished) == self.total


@dataclass(frozen=True)
class SweepDir:
    """One sweep's storage folder (see the module docstring for what each file holds).

    Attributes:
        root: the absolute folder ``<storage>/<name>``; on a cluster, shared by every node.
    """

    root: Path

    @classmethod
    def of(cls, storage: Path, name: str) -> SweepDir:
        return cls((Path(storage) / name).resolve())

    @property
    def space_file(self) -> Path:
        return self.root / "space.yaml"

    @property
    def trials_file(self) -> Path:
        return self.root / "trials.json"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def refine_marker(self) -> Path:
        return self.root / "refine.json"

    @property
    def done_file(self) -> Path:
        return self.root / "done.json"

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.root / "trials" / trial_id)

    def exists(self) -> bool:
        """True once a sweep recorded its trials here."""
        return self.trials_file.is_file()

    # ---------------------------------------------------------------- the trials

    def record(self, space: SearchSpace, trials: list[TrialSpec]) -> None:
        """Write space.yaml and trials.json; refuse to reuse the folder for another space."""
        self.root.mkdir(parents=True, exist_ok=True)
        listing = {t.id: {"overrides": t.overrides, "config": t.config.to_dict(), "run_name": t.run_name}
                   for t in trials}  # fmt: skip
        if self.exists():
            old = self.load_trials()
            if {k: v["overrides"] for k, v in old.items()} != {k: v["overrides"] for k, v in listing.items()}:
                raise ConfigError(
                    f"sweep folder {self.root} holds another search space; choose another --name or remove the folder"
                )
            return
        # The base is stored resolved, so the folder alone can rebuild the space.
        resolved = {k: v for k, v in space.raw.items() if k != "set"} | {"base": space.base}
        atomic_write_text(self.space_file, yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(self.trials_file, listing)

    def load_trials(self) -> dict[str, dict[str, Any]]:
        """The recorded trials (id → overrides, config, run_name)."""
        if not self.exists():
            raise ConfigError(f"{self.root}: not a sweep folder (no trials.json); expected <storage>/<name>")
        return json.loads(self.trials_file.read_text())

    def rewrite_configs(self, trials: list[TrialSpec]) -> None:
        """Record the trials' configs as they now are (teacher checkpoints pinned)."""
        listing = self.load_trials()
        for t in trials:
            listing[t.id]["config"] = t.config.to_dict()
        atomic_write_json(self.trials_file, listing)

    def pin_teacher(self, cached: Path) -> Path:
        """A copy of a cached teacher checkpoint inside the sweep (shared storage on a cluster)."""
        pinned = self.teachers / Path(cached).name
        if not pinned.is_file():
            self.teachers.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, pinned)
        return pinned

    def write_rerun_config(self, trial_id: str | None) -> Path:
        """The resolved config of one trial as a YAML file ``wsss trial`` reads."""
        trials = self.load_trials()
        if trial_id not in trials:
            from training.errors import did_you_mean

            raise ConfigError(
                f"--trial {trial_id!r}: not in sweep {self.root.name}{did_you_mean(trial_id or '', trials)}; "
                f"trials: {', '.join(trials)}"
            )
        out = self.root / "reruns" / f"{trial_id}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(json.loads(json.dumps(trials[trial_id]["config"])), sort_keys=False))
        return out

    # ---------------------------------------------------------------- their results

    def status(self) -> SweepStatus:
        """Which trials finished and which diverged, from what is on disk."""
        trials = self.load_trials()
        finished = [t for t in trials if self.trial(t).finished()]
        failed = [t for t in trials if t not in finished and self.trial(t).diverged.is_file()]
        return SweepStatus(finished, failed, len(trials))

    def failure_reason(self, trial_id: str) -> str:
        """Why a failed trial stopped, from its ``diverged.json``."""
        return self.trial(trial_id).diverged_reason() or "unknown"

    def result_rows(self) -> list[dict[str, Any]]:
        """One flat row per finished trial: resolved config keys + metrics + labels."""
        rows = []
        for trial_id, rec in self.load_trials().items():
            trial = self.trial(trial_id)
            if not trial.finished():
                continue
            row: dict[str, Any] = {k: _number_or_text(v) for k, v in flatten(rec["config"]).items()}
            cfg = from_dict(TrialConfig, rec["config"])
            row |= {"trial_id": trial_id, "run_name": rec["run_name"], "arm": arm(cfg)}
            row |= trial.read_metrics()
            rows.append(row)
        return rows

    def mark_done(self, status: SweepStatus) -> None:
        atomic_write_json(self.done_file, {"finished": status.finished, "total": status.total}, indent=None)


def _number_or_text(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value
