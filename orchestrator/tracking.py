"""MLflow bookkeeping for sweeps: one parent run per sweep, one child run per trial.

Everything goes through an explicit ``MlflowClient`` (never the fluent
``mlflow.start_run`` global state) because trials run in Ray worker processes.
Runs are found by tags before they are created, so a restored sweep or a
retried trial writes into the run it already has instead of a duplicate:

* parent: ``wsss.sweep=<name>``, ``wsss.role=parent``
* child: ``wsss.trial_id=<id>``, ``mlflow.parentRunId=<parent>`` (MLflow's nesting tag)

The driver must call :meth:`SweepTracking.open` before any trial starts: many
processes opening a fresh sqlite database at once crash in the schema migration.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from training.errors import ConfigError, WsssError

SWEEP_TAG = "wsss.sweep"
ROLE_TAG = "wsss.role"
TRIAL_TAG = "wsss.trial_id"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow 3.17 accepts 6000 characters, older servers 500: stay within what every server takes.
MAX_PARAM_VALUE = 500
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_TRUNCATED = "..."


class TrackingUnavailable(WsssError):
    """The MLflow tracking store cannot be reached or written."""


def default_tracking_uri(cwd: Path) -> str:
    """``sqlite:///<absolute cwd>/mlflow.db``: the store ``mlflow ui`` finds when started in ``cwd``."""
    return "sqlite:///" + str((Path(cwd) / "mlflow.db").resolve())


def default_artifact_root(uri: str) -> str | None:
    """``file://`` URI of ``mlruns`` next to a sqlite DB; None for other stores (the server decides).

    MLflow's own default, ``./mlruns`` relative to the process's cwd, is wrong
    inside Ray trials and for a DB given by absolute path elsewhere.
    """
    path = _sqlite_path(uri)
    return None if path is None else (path.parent / "mlruns").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail early, before a sweep starts, when the tracking store is unusable.

    Args:
        uri: tracking URI (``http(s)://host:port``, ``sqlite:///path``, ``file:///path``).
        timeout: seconds to wait for an HTTP server's ``/health`` answer.

    Raises:
        TrackingUnavailable: the server does not answer, or the store's folder is not writable.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_http(uri, timeout)
        return
    if parsed.scheme == "sqlite":
        path = _sqlite_path(uri)
        folder = path.parent if path else None
    elif parsed.scheme in ("file", ""):
        path = Path(parsed.path if parsed.scheme else uri).resolve()
        folder = next(p for p in (path, *path.parents) if p.exists())
    else:
        return  # databricks, postgresql, ...: MLflow reports its own errors
    if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise TrackingUnavailable(
            f"tracking store {uri}: folder {folder} does not exist or is not writable; "
            "expected a writable folder for the MLflow database and artifacts."
        )


def store_exists(uri: str) -> bool:
    """False only for a ``sqlite:///`` store whose database file does not exist yet."""
    path = _sqlite_path(uri)
    return path is None or path.is_file()


def _check_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is not reachable ({reason} from {url}). "
        "Start one with `mlflow server --host 127.0.0.1 --port 5000 "
        "--backend-store-uri sqlite:///mlflow.db`, or pass a sqlite:///<path>/mlflow.db URI."
    )


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), None for in-memory or other stores."""
    if not uri.startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict → flat dict with dotted keys and string values.

    Args:
        d: e.g. ``{"transfer": {"lam": 1.0, "metric": "cosine"}}``.
        prefix: prepended to every key (``"cfg"`` gives ``"cfg.transfer.lam"``).

    Returns:
        e.g. ``{"transfer.lam": "1.0", "transfer.metric": "cosine"}``.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)
    return flat


def _clip(value: str, limit: int = MAX_PARAM_VALUE) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _quote(value: str, what: str) -> str:
    """A value safe inside an MLflow filter string literal."""
    if "'" in value or "\\" in value:
        raise ConfigError(f"{what} {value!r} contains a quote or backslash; expected plain text")
    return f"'{value}'"


class _LazyClient:
    """Builds its ``MlflowClient`` on first use; pickles without it, so it travels into Ray workers."""

    _client = None

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @property
    def client(self):
        """The ``MlflowClient`` for :attr:`uri`."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}


def _log_new_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params the run does not have yet, in batches.

    MLflow raises when a param is logged again with another value; a restored
    trial re-logs its params, so present keys are skipped.
    """
    from mlflow.entities import Param

    present = client.get_run(run_id).data.params
    new = [Param(k, _clip(v)) for k, v in flatten(params).items() if k not in present]
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])


class MlflowTracker(_LazyClient):
    """The ``training.tracker.Tracker`` protocol, writing into one MLflow run.

    Args:
        uri: tracking URI.
        run_id: the run every call writes into (a trial's, or a sweep's parent run).
    """

    def __init__(self, uri: str, run_id: str) -> None:
        super().__init__(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (nested dicts flattened to dotted keys); keys already present are kept."""
        _log_new_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log all ``metrics`` at ``step`` (0 when None) in one ``log_batch`` request."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's contents) under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags in one request."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_status(self, status: str) -> None:
        """Reopen the run (RUNNING) or terminate it (FINISHED, FAILED or KILLED)."""
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        elif status in TERMINAL_STATUSES:
            self.client.set_terminated(self.run_id, status=status)
        else:
            raise ConfigError(f"run status {status!r}; expected RUNNING or one of {', '.join(TERMINAL_STATUSES)}")

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        """The artifact paths directly under ``artifact_path`` (files and folders)."""
        return [f.path for f in self.client.list_artifacts(self.run_id, artifact_path)]

    def download_artifact(self, artifact_path: str, dst: Path) -> Path:
        """Copy one logged artifact into the folder ``dst``; returns the local file."""
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))


class SweepTracking(_LazyClient):
    """One sweep's parent run and its children in an MLflow experiment.

    Build it with :meth:`open` (creates what is missing) or :meth:`find`
    (existing sweeps only). It pickles, so trials may call :meth:`child_run`.

    Attributes:
        uri: tracking URI.
        experiment_id: the experiment holding the sweep.
        parent_run_id: the sweep's parent run.
        sweep_name: the ``wsss.sweep`` tag value.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str) -> None:
        super().__init__(uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name

    @classmethod
    def open(
        cls, uri: str, experiment: str, sweep_name: str, *, space: Mapping[str, Any], description: str = ""
    ) -> SweepTracking:
        """Find or create the experiment and the sweep's parent run.

        Opening the same ``sweep_name`` again returns the same parent run (a
        restored sweep), set back to RUNNING if it had been closed; the search
        space artifact and the description are refreshed.

        Args:
            uri: tracking URI.
            experiment: MLflow experiment name.
            sweep_name: unique name of the sweep within the experiment.
            space: the search space, logged as ``search_space.yaml``.
            description: shown as the run's description in the MLflow UI.
        """
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_id = _get_or_create_experiment(client, uri, experiment)
        parent = _find_parent(client, [experiment_id], sweep_name)
        if parent is None:
            tags = {SWEEP_TAG: sweep_name, ROLE_TAG: "parent"}
            parent_id = client.create_run(experiment_id, run_name=f"sweep:{sweep_name}", tags=tags).info.run_id
        else:
            parent_id = parent.info.run_id
            if parent.info.status != "RUNNING":
                client.update_run(parent_id, status="RUNNING")
        tracking = cls(uri, experiment_id, parent_id, sweep_name)
        tracking._client = client
        tracking._describe(space, description)
        return tracking

    @classmethod
    def find(cls, uri: str, sweep_name: str, experiment: str | None = None) -> SweepTracking:
        """The tracking of an existing sweep, searched in one or all experiments.

        Raises:
            ConfigError: no parent run carries ``wsss.sweep=<sweep_name>``; lists known sweeps.
        """
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment) if experiment else None
        ids = [e.experiment_id for e in ([found] if experiment else client.search_experiments()) if e]
        parent = _find_parent(client, ids, sweep_name) if ids else None
        if parent is None:
            known = sorted(_known_sweeps(client, ids)) if ids else []
            raise ConfigError(
                f"no sweep named {sweep_name!r} in {uri}"
                + (f" (experiment {experiment!r})" if experiment else "")
                + f"; known sweeps: {', '.join(known) or 'none'}"
            )
        tracking = cls(uri, parent.info.experiment_id, parent.info.run_id, sweep_name)
        tracking._client = client
        return tracking

    def _describe(self, space: Mapping[str, Any], description: str) -> None:
        from mlflow.entities import RunTag

        text = yaml.safe_dump(_plain(space), sort_keys=False)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "search_space.yaml").write_text(text)
            self.client.log_artifact(self.parent_run_id, str(Path(tmp) / "search_space.yaml"))
        sha = hashlib.sha1(text.encode()).hexdigest()[:12]
        self.client.log_batch(self.parent_run_id, tags=[RunTag(NOTE_TAG, description), RunTag("wsss.space_sha1", sha)])
        params = {"sweep.name": self.sweep_name, "sweep.space_sections": ",".join(str(k) for k in space)}
        _log_new_params(self.client, self.parent_run_id, params)

    def child_run(self, trial_id: str, *, run_name: str, params: Mapping[str, Any]) -> str:
        """Find or create the run of one trial and log its params once.

        A run found again (Ray retry or restore) that had been terminated is set
        back to RUNNING, since the trial is running again.

        Args:
            trial_id: Ray Tune's trial id, unique within the sweep.
            run_name: readable name shown in the MLflow UI.
            params: the trial's config (nested dicts flattened to dotted keys).

        Returns:
            The child run id.
        """
        run = self.find_child(trial_id)
        if run is None:
            tags = {TRIAL_TAG: trial_id, PARENT_TAG: self.parent_run_id, SWEEP_TAG: self.sweep_name, ROLE_TAG: "trial"}
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        else:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        _log_new_params(self.client, run_id, params)
        return run_id

    def tracker(self, run_id: str) -> MlflowTracker:
        """A picklable ``Tracker`` writing into ``run_id`` (sharing this object's client, if it has one)."""
        tracker = MlflowTracker(self.uri, run_id)
        tracker._client = self._client
        return tracker

    @property
    def parent(self) -> MlflowTracker:
        """The ``Tracker`` of the sweep's parent run: its tables, plots, description and status."""
        return self.tracker(self.parent_run_id)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run terminated with ``status`` (FINISHED, FAILED or KILLED)."""
        if status not in TERMINAL_STATUSES:
            raise ConfigError(f"run status {status!r}; expected one of {', '.join(TERMINAL_STATUSES)}")
        self.client.set_terminated(run_id, status=status)

    def close_dangling(self, status: str = "KILLED") -> list[str]:
        """Terminate the parent and every child still RUNNING (after an interrupted sweep).

        Returns:
            The ids of the runs that were closed.
        """
        dangling = [r.info.run_id for r in self.child_runs() if r.info.status == "RUNNING"]
        if self.client.get_run(self.parent_run_id).info.status == "RUNNING":
            dangling.append(self.parent_run_id)
        for run_id in dangling:
            self.finish(run_id, status)
        return dangling

    def child_runs(self) -> list:
        """Every trial run of this sweep (``mlflow.entities.Run``), oldest first."""
        query = f"tags.`{PARENT_TAG}` = {_quote(self.parent_run_id, 'run id')}"
        runs = list(_search_runs(self.client, [self.experiment_id], query))
        return sorted(runs, key=lambda r: r.info.start_time or 0)

    def find_child(self, trial_id: str):
        """The run of ``trial_id`` (``mlflow.entities.Run``), or None."""
        query = (
            f"tags.`{TRIAL_TAG}` = {_quote(trial_id, 'trial id')} "
            f"and tags.`{PARENT_TAG}` = {_quote(self.parent_run_id, 'run id')}"
        )
        return next(_search_runs(self.client, [self.experiment_id], query), None)


def _get_or_create_experiment(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {name!r} in {uri} is deleted; restore it "
                "(`mlflow experiments restore`) or choose another experiment name"
            )
        return found.experiment_id
    root = default_artifact_root(uri)
    location = f"{root}/{_slug(name)}" if root else None
    # Model-training experiment: the UI opens on runs, metrics and artifacts (not its GenAI views).
    kind = {EXPERIMENT_KIND_TAG: "custom_model_development"}
    return client.create_experiment(name, artifact_location=location, tags=kind)


def _slug(name: str) -> str:
    """A folder name for an experiment: readable, unique per name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "exp"
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _find_parent(client, experiment_ids: list[str], sweep_name: str):
    query = f"tags.`{SWEEP_TAG}` = {_quote(sweep_name, 'sweep name')} and tags.`{ROLE_TAG}` = 'parent'"
    runs = sorted(_search_runs(client, experiment_ids, query), key=lambda r: r.info.start_time or 0)
    return runs[0] if runs else None


def _known_sweeps(client, experiment_ids: list[str]) -> set[str]:
    runs = _search_runs(client, experiment_ids, f"tags.`{ROLE_TAG}` = 'parent'")
    return {r.data.tags.get(SWEEP_TAG, "?") for r in runs}


def _search_runs(client, experiment_ids: list[str], query: str) -> Iterator:
    """Every active run matching ``query``, following page tokens."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _plain(value: Any) -> Any:
    """Tuples, paths and other leaves → YAML-safe values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
