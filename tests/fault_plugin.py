"""Real faults inside real sweep trials, through the product's one test seam (`orchestrator.trainable`).

A test that runs ``wsss sweep`` sets, in the driver's environment (a local Ray's
trials inherit it)::

    PYTHONPATH=<repo>/tests                     # so trials can import this module
    WSSS_TRIAL_HOOKS=fault_plugin:FaultHooks
    WSSS_FAULT_INJECT=kind:trial_id[:arg],...

with these kinds:

- ``crash_once:<id>:<epoch>``: the trial raises once, right after that epoch's
  checkpoint reached Tune; a marker file in its folder keeps the retry from
  crashing again.
- ``tracking_down:<id>``: the trial's MLflow calls go to a dead server (nothing
  listens on the port), so its very first call fails as it would mid-sweep.
  Set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` too, or MLflow retries for minutes.

`fault_env` builds that environment.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from orchestrator.tracking import MlflowTracker
from orchestrator.trainable import HOOKS_ENV, TrialHooks
from training.errors import ConfigError
from training.trial_dir import TrialDir

FAULT_ENV = "WSSS_FAULT_INJECT"
FAULT_KINDS = ("crash_once", "tracking_down")
CRASH_MARKER = ".injected-crash_once"


def fault_env(faults: str) -> dict[str, str]:
    """The environment a ``wsss sweep`` subprocess needs to inject ``faults`` into its trials."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, HOOKS_ENV: "fault_plugin:FaultHooks", FAULT_ENV: faults,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip


def parse_faults(spec: str) -> dict[str, dict[str, str]]:
    """``"crash_once:000-a:1,tracking_down:001-b"`` → ``{"000-a": {"crash_once": "1"}, "001-b": {...}}``.

    Raises:
        ConfigError: an unknown kind, named with the valid ones.
    """
    faults: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, rest = item.partition(":")
        target, _, arg = rest.partition(":")
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{FAULT_ENV}: unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        faults.setdefault(target, {})[kind] = arg
    return faults


class FaultHooks(TrialHooks):
    """The faults ``$WSSS_FAULT_INJECT`` names, read in each trial's process (and once in the driver)."""

    def __init__(self) -> None:
        self.faults = parse_faults(os.environ.get(FAULT_ENV, ""))

    def tracker(self, trial_id: str, tracker: MlflowTracker) -> MlflowTracker:
        if "tracking_down" not in self.faults.get(trial_id, {}):
            return tracker
        return MlflowTracker(f"http://127.0.0.1:{_free_port()}", tracker.run_id)

    def epoch_reported(self, trial_id: str, trial: TrialDir, epoch: int) -> None:
        if self.faults.get(trial_id, {}).get("crash_once") != str(epoch):
            return
        marker = trial.path / CRASH_MARKER
        if not marker.exists():  # the retry must not crash again
            marker.touch()
            raise RuntimeError(f"injected crash after epoch {epoch} ({FAULT_ENV})")


def _free_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
