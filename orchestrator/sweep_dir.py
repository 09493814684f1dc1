"""The storage folder of one sweep: its layout, and the reads and atomic writes of its files.

Every module that touches a sweep's folder names its files through `SweepDir`,
so the layout is written down once, here::

    <storage>/<name>/space.yaml      the sweep file as given, its base (and search:) resolved (rebuilds the space)
    <storage>/<name>/trials.json     the expanded trials: id → overrides, resolved config, run name, origin;
                                     a search appends each suggestion, in order, before it runs
    <storage>/<name>/trials/<id>/    each trial's folder (`training.trial_dir.TrialDir`)
    <storage>/<name>/teachers/       frozen teachers, pinned here for teacher_student trials
    <storage>/<name>/tune/           Ray Tune's own experiment state (restored on rerun)
    <storage>/<name>/refine.json     the last complete refinement: its section, trials, tables, nodes
    <storage>/<name>/reruns/<id>.yaml  a trial's config as written for ``wsss trial --from-sweep``
    <storage>/<name>/done.json       written when every trial has finished
    <storage>/<name>/driver.lock     who runs the sweep now (`orchestrator.sweep_lock`)

What a trial's state is (finished, diverged, stopped early, still to run) is
read from the disk, never from Tune or MLflow: the folder is the record that
survives them. A search's searcher is rebuilt from it too (`orchestrator.search`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.space import SearchSpace, TrialSpec, arm
from orchestrator.sweep_lock import SweepLock
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
    total: int  # every trial the sweep will run (a search's budget, not only those suggested so far)
    stopped: list[str] = field(default_factory=list)  # stopped early by the scheduler (ASHA), by design

    @property
    def settled(self) -> bool:
        """Nothing is left to run: every trial finished, diverged or was stopped early."""
        return len(self.finished) + len(self.failed) + len(self.stopped) == self.total

    @property
    def complete(self) -> bool:
        """Every trial ran as the sweep means it to: to the end, or until the scheduler stopped it."""
        return len(self.finished) + len(self.stopped) == self.total


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

    @property
    def lock_file(self) -> Path:
        return self.root / "driver.lock"

    def lock(self, **options: Any) -> SweepLock:
        """The sweep's one-driver lock, to hold in a ``with`` block (`SweepLock` takes ``options``).

        Raises (on entering):
            SweepLocked: another live driver runs this sweep.
        """
        return SweepLock(self.lock_file, self.root.name, **options)

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.root / "trials" / trial_id)

    def exists(self) -> bool:
        """True once a sweep recorded its trials here."""
        return self.trials_file.is_file()

    # ---------------------------------------------------------------- the trials

    def record(self, space: SearchSpace, trials: list[TrialSpec]) -> list[TrialSpec]:
        """Write space.yaml and trials.json; refuse to reuse the folder for another space.

        Returns:
            The trials recorded: ``trials`` for a grid; for a search, its known
            points and every trial suggested so far, in the order they were suggested.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        listing = {t.id: _entry(t, "known") for t in trials}
        if self.exists():
            old = self.load_trials()
            known = {k: v["overrides"] for k, v in old.items() if v.get("origin", "known") == "known"}
            if known != {k: v["overrides"] for k, v in listing.items()} or not self._same_search(space, len(old)):
                raise ConfigError(
                    f"sweep folder {self.root} holds another search space; choose another --name or remove the folder"
                )
            return self.recorded_trials() if space.search else trials
        self._write_space(space)
        atomic_write_json(self.trials_file, listing)
        return trials

    def record_suggestion(self, trial: TrialSpec) -> None:
        """Append a trial a searcher suggested (before it runs), so a resumed search never suggests it again."""
        listing = self.load_trials()
        if trial.id in listing:
            raise ConfigError(f"{self.trials_file}: trial {trial.id} is recorded already")
        listing[trial.id] = _entry(trial, "suggested")
        atomic_write_json(self.trials_file, listing)

    def recorded_trials(self) -> list[TrialSpec]:
        """Every recorded trial, in order, as it will run (its config as recorded)."""
        return [
            TrialSpec(trial_id, rec["overrides"], from_dict(TrialConfig, rec["config"]))
            for trial_id, rec in self.load_trials().items()
        ]

    def budget(self) -> int | None:
        """A search's ``num_trials`` as recorded in space.yaml; None for a grid."""
        stored = yaml.safe_load(self.space_file.read_text()) if self.space_file.is_file() else None
        search = (stored or {}).get("search")
        return int(search["num_trials"]) if search else None

    def _write_space(self, space: SearchSpace) -> None:
        # The base is stored resolved, so the folder alone can rebuild the space; the search with its defaults.
        resolved = {k: v for k, v in space.raw.items() if k != "set"} | {"base": space.base}
        if space.search is not None:
            resolved["search"] = asdict(space.search)
        atomic_write_text(self.space_file, yaml.safe_dump(resolved, sort_keys=False))

    def _same_search(self, space: SearchSpace, recorded: int) -> bool:
        """The same search (sample and search: as before; a budget may grow, never below what ran),
        or the same absence of one. A changed budget is written down."""
        stored = yaml.safe_load(self.space_file.read_text()) or {}
        before, now = stored.get("search"), asdict(space.search) if space.search else None
        if before is None or now is None:
            return before is now
        budget = now.pop("num_trials")
        if before.pop("num_trials") != budget:
            if budget < recorded:
                return False
            self._write_space(space)
        return before == now and (stored.get("sample") or {}) == (space.raw.get("sample") or {})

    def load_trials(self) -> dict[str, dict[str, Any]]:
        """The recorded trials (id → overrides, config, run_name, origin), in the order they were recorded."""
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
        """Which trials finished, diverged or were stopped early, from what is on disk."""
        trials = self.load_trials()
        finished = [t for t in trials if self.trial(t).finished()]
        failed = [t for t in trials if t not in finished and self.trial(t).diverged.is_file()]
        stopped = [t for t in trials if t not in finished and t not in failed and self.trial(t).stopped.is_file()]
        return SweepStatus(finished, failed, max(len(trials), self.budget() or 0), stopped)

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


def _entry(trial: TrialSpec, origin: str) -> dict[str, Any]:
    """A trial as trials.json holds it; ``origin`` is ``known`` (expanded) or ``suggested`` (by a searcher)."""
    config = trial.config.to_dict()
    return {"overrides": trial.overrides, "config": config, "run_name": trial.run_name, "origin": origin}


def _number_or_text(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value
