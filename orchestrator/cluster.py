"""Ray for one driver command: where it starts, what it is checked for, how it stops.

`RaySession` is the one way the driver commands (``wsss sweep``, ``wsss refine``)
get Ray: it starts Ray only when first needed (a settled sweep never does),
joins a cluster or a Ray job's cluster when there is one, takes SIGTERM as
Ctrl-C while it lives, and shuts Ray down at the end. `check_cluster` is the
pure check of the cluster's nodes against what the sweep asks for.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.config.sweep import Resources
from training.errors import ConfigError, WsssError

HOOKS_ENV = "WSSS_TRIAL_HOOKS"  # the test seam each trial reads (`trainable.load_trial_hooks`); unset in use
# Passed on to trials: the test seam, and how long MLflow retries a dead server.
PASSED_ENV = (HOOKS_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


class ClusterError(WsssError):
    """The Ray cluster cannot run this sweep as configured."""


class RaySession:
    """Ray for the lifetime of a ``with`` block, started on the first `start`.

    Args:
        address: an existing Ray cluster (``auto`` or ``host:port``); None = the
            Ray job's cluster when run inside ``ray job submit``, else a local Ray.
        num_cpus: CPUs of a local Ray instance (default: all).
        verbose: Ray's own logging at INFO and the workers' output in the driver's
            (default: warnings only, the workers' logs in Ray's log folder).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *, verbose: bool = False) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.verbose = verbose
        self.started = False
        self._sigterm = None

    def __enter__(self) -> RaySession:
        self._sigterm = _forward_sigterm()
        return self

    def start(self) -> RaySession:
        """Start (or join) Ray unless this session already did; returns self."""
        if not self.started:
            start_ray(self.address, self.num_cpus, verbose=self.verbose)
            self.started = True
            _forward_sigterm()  # ray.init installs its own SIGTERM handler in the driver: ours goes on top
        return self

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, as ``ray.nodes()`` describes them (after `start`)."""
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def __exit__(self, *exc) -> None:
        try:
            if self.started:
                import ray

                ray.shutdown()
        finally:
            _restore_sigterm(self._sigterm)


def start_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool = False) -> None:
    """``ray.init`` as every driver command wants it (see `RaySession` for the arguments)."""
    import ray

    # Trials write only absolute paths, so keep every worker in the driver's cwd.
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(env)
    # Per-epoch checkpoints are small and frequent by design; Tune's warning about them is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    env |= {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    address = address or job_cluster()
    # Workers' own logs ("Checkpoint successfully created" each epoch) stay in Ray's log folder
    # on their node unless verbose; a failing trial is still reported by Tune with its error file.
    quiet = {"logging_level": "INFO" if verbose else "WARNING", "log_to_driver": verbose}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
        return
    ray.init(
        # "local": a new instance even while a `ray start` cluster runs on this machine (which a
        # bare ray.init() would join, and then refuse num_cpus).
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=300 * 1024 * 1024,  # trials pass paths, not arrays
        runtime_env={"env_vars": env},
        **quiet,
    )


def check_cluster(nodes: Sequence[Mapping[str, Any]], want: Resources, *, storage_is_shared: bool) -> None:
    """Fail fast on what would otherwise hang or lose results on a cluster.

    Args:
        nodes: the live nodes, each with ``Resources`` (``{"CPU": 8.0, "GPU": 1.0, ...}``)
            as ``ray.nodes()`` gives them.
        want: what each trial asks for.
        storage_is_shared: the user declared the sweep's storage mounted on every node.

    Raises:
        ClusterError: several nodes on local storage, or no node big enough for one trial.
    """
    if len(nodes) > 1 and not storage_is_shared:
        raise ClusterError(
            f"the Ray cluster has {len(nodes)} nodes but --storage is a local path: trials on other nodes "
            "would write where the driver cannot read. Mount shared storage (NFS) on every node, point "
            "--storage at it and pass --storage-is-shared"
        )
    if not fits(nodes, want):
        raise ClusterError(f"resources: {no_node_fits(nodes, want)}; no trial could ever start")


def fits(nodes: Sequence[Mapping[str, Any]], want: Resources) -> bool:
    """Whether some node of ``nodes`` (as in `check_cluster`) is big enough for one trial."""
    return any(want.cpu <= n["Resources"].get("CPU", 0) and want.gpu <= n["Resources"].get("GPU", 0) for n in nodes)


def no_node_fits(nodes: Sequence[Mapping[str, Any]], want: Resources) -> str:
    """What a user reads when no node is big enough: what a trial asks for, what the nodes offer."""
    best_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    return (f"each trial asks for cpu={want.cpu:g}, gpu={want.gpu:g}, but the largest of the {len(nodes)} live "
            f"node(s) has cpu={best_cpu:g}, gpu={best_gpu:g}")  # fmt: skip


class NodeWatch:
    """While Tune runs: notice when no live node can hold a trial any more, wait, then stop.

    A trial whose node is lost is retried by Tune, and waits for a node big
    enough; if the lost node was the only one (the only GPU node, say), Tune
    would wait silently forever. This watch says so at once, waits up to
    ``resources.wait_for_node_s`` for such a node to join (or come back), and
    then stops the sweep the way Ctrl-C does: Tune saves its state, the driver
    closes the runs and prints the command that resumes.

    Args:
        want: what each trial asks for (its ``wait_for_node_s`` is the timeout).
        sweep: the sweep's name, for messages.
        nodes: returns the live nodes (`RaySession.nodes`).
        poll_s: seconds between two looks at the nodes.
        say: prints one message line (the driver passes the sweep's console's, so it lands
            below its live table; default: a line on stderr).
        stop: stops the sweep (default: Ctrl-C in the main thread, so Tune's own handler saves its state).
    """

    def __init__(self, want: Resources, *, sweep: str, nodes, poll_s: float = 2.0, say=None, stop=None) -> None:
        self.want, self.sweep, self.nodes, self.poll_s = want, sweep, nodes, poll_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stop = stop or (lambda: _thread.interrupt_main(signal.SIGINT))
        self.gave_up: str | None = None  # why the sweep was stopped, once it was
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="node-watch", daemon=True)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _say(self, text: str) -> None:
        self.say(f"sweep {self.sweep}: {text}")

    def _watch(self) -> None:
        since = None  # when the cluster last stopped fitting a trial
        while not self._done.wait(self.poll_s):
            try:
                nodes = self.nodes()
            except Exception:  # Ray itself going away ends the sweep anyway; nothing to say here
                continue
            if fits(nodes, self.want):
                if since is not None:
                    self._say("a node that can hold a trial is live again; the sweep goes on")
                since = None
                continue
            now = time.monotonic()
            if since is None:
                since = now
                self._say(
                    f"waiting: no live node can hold a trial now ({no_node_fits(nodes, self.want)}); was a node "
                    f"lost? Waiting up to {self.want.wait_for_node_s:g} s (resources.wait_for_node_s) for one to "
                    "join, then the sweep stops, its state saved, to resume with the same command"
                )
            elif now - since >= self.want.wait_for_node_s:
                self.gave_up = f"no live node could hold a trial for {self.want.wait_for_node_s:g} s"
                self._say(f"{self.gave_up} (resources.wait_for_node_s): stopping the sweep")
                self.stop()
                return


def job_cluster() -> str | None:
    """Inside `ray job submit`, Ray sets RAY_ADDRESS to the cluster's GCS: join it, do not start one."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard (Jobs API) address; a sweep joins a cluster by its GCS "
            "address (--address host:port) or runs inside `ray job submit --address <that URL> -- wsss sweep ...`"
        )
    return address or None


def in_ray_job() -> bool:
    """True in the driver of a job submitted with a working_dir (its cwd is a temporary copy)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except ValueError:
        return False


def check_job_outputs(storage: Path, tracking_uri_given: bool) -> None:
    """Refuse outputs that would vanish with a job's temporary working directory."""
    if not in_ray_job():
        return
    if not storage.is_absolute():
        raise ConfigError(
            f"--storage {storage}: inside a Ray job the working directory is a temporary copy that Ray "
            "deletes; give an absolute path every node can reach (shared storage on a multi-node cluster)"
        )
    if not tracking_uri_given:
        raise ConfigError(
            "--tracking-uri: inside a Ray job the default (sqlite in the working directory) would be deleted "
            "with it; pass the MLflow server, e.g. --tracking-uri http://127.0.0.1:5000 "
            "(or set MLFLOW_TRACKING_URI; `wsss services up` sets it for its jobs)"
        )


@contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM (`kill`, a batch scheduler, `ray job stop`) takes the graceful path of Ctrl-C.

    Tune handles SIGINT by saving its state and returning from ``fit``, after
    which the driver closes the runs left open and prints the resume command.
    Outside ``fit`` the SIGINT handler raises KeyboardInterrupt, handled alike.
    """
    previous = _forward_sigterm()
    try:
        yield
    finally:
        _restore_sigterm(previous)


_NOT_MAIN_THREAD = object()  # signal handlers can only be set from the main thread


def _forward_sigterm():
    """Hand SIGTERM to the SIGINT handler from now on; returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return _NOT_MAIN_THREAD
    return signal.signal(signal.SIGTERM, _sigterm_to_sigint)


def _sigterm_to_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def _restore_sigterm(previous) -> None:
    if previous is not _NOT_MAIN_THREAD:
        # None: the previous handler was installed from C (Ray's crash logger) and cannot be put back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
