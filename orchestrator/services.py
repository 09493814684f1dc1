"""The local services a sweep talks to: a Ray head (dashboard + Jobs API) and an MLflow server.

``wsss services up`` starts both on 127.0.0.1 and records each one's process id (and
start time, so a reused pid is never mistaken for ours) in ``<folder>/services.json``;
``wsss services down`` stops exactly those process groups and nothing else, unlike
``ray stop``, which kills every Ray process of the machine.

Both run as session leaders (``start_new_session``), so a service and every process it
spawned (Ray's GCS, raylet, dashboard and workers; MLflow's web workers) share one process
group that ``down`` can wait for and, as a last resort, kill.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.ray_auth import ensure_ray_token
from training.atomic import atomic_write_text
from training.errors import WsssError

STATE_FILE = "services.json"
PORTS_OF = {"ray": ("ray", "dashboard", "client"), "mlflow": ("mlflow",)}
ENV_FILE = "env.sh"
LOOPBACK = "127.0.0.1"
# Each service takes 10-20 s to answer on an idle 2-core machine; measured over 120 s for MLflow's two
# web workers on one loaded to 14 (four trainings beside it). Waiting long costs nothing: an answer
# ends the wait.
UP_TIMEOUT_S = 300.0
WORKER_HEALTHCHECK_S = 120  # seconds an MLflow web worker may take to answer its supervisor


class ServiceError(WsssError):
    """A service could not be started, found or stopped."""


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the services (the defaults are Ray's and MLflow's own)."""

    ray: int = 6379  # GCS: `wsss sweep --address 127.0.0.1:<ray>`
    dashboard: int = 8265  # dashboard + Jobs API: `ray job submit --address http://127.0.0.1:<dashboard>`
    client: int = 10001  # Ray Client server
    mlflow: int = 5000

    def check_free(self, names: tuple[str, ...]) -> None:
        """Fail before starting anything if a port is taken (naming the flag that moves it)."""
        for name in names:
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ServiceError(f"--{name}-port {port}: expected a port number in 1..65535")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                # As servers bind: old connections in TIME_WAIT do not make a port busy.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    raise ServiceError(
                        f"port {port} on {LOOPBACK} is already in use; pass --{name}-port with a free one"
                    ) from None


@dataclass
class Service:
    """One started service, as recorded in the state file.

    Attributes:
        name: ``ray`` or ``mlflow``.
        pid: the session leader's pid (also its process group id).
        started: the process's start time (psutil ``create_time``): tells a reused pid apart.
        url: where it answers (dashboard for Ray, tracking URI for MLflow).
        log: its stdout/stderr file.
        argv: the exact command.
        extra: addresses worth printing (e.g. Ray's GCS address).
    """

    name: str
    pid: int
    started: float
    url: str
    log: str
    argv: list[str]
    extra: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        """True while the recorded process (not just its pid number) still runs."""
        import psutil

        _reap(self.pid)
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


# ---------------------------------------------------------------- state file


def load_state(folder: Path) -> dict[str, Service]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {name: Service(**rec) for name, rec in raw.items()}
    except (ValueError, TypeError) as err:
        raise ServiceError(f"{path}: not a services state file ({err}); stop the processes by hand") from None


def _save_state(folder: Path, services: dict[str, Service]) -> None:
    atomic_write_text(Path(folder) / STATE_FILE, json.dumps({k: asdict(v) for k, v in services.items()}, indent=1))


# ---------------------------------------------------------------- up


def up(
    folder: Path,
    *,
    ports: Ports = Ports(),
    ray: bool = True,
    mlflow: bool = True,
    num_cpus: int | None = None,
    mlflow_store: Path | None = None,
    timeout: float = UP_TIMEOUT_S,
) -> dict[str, Service]:
    """Start the requested services (those already running are kept) and wait until they answer.

    Args:
        folder: holds the state file, the logs and ``env.sh``.
        ports: loopback ports.
        ray, mlflow: which services to start.
        num_cpus: CPUs the Ray head offers (default: all).
        mlflow_store: folder of the MLflow server's sqlite database and artifacts
            (default: ``<folder>/mlflow``); kept across ``down``/``up``.
        timeout: seconds to wait for each service to answer (an answer ends the wait at once).

    Returns:
        Every service recorded in the state file, by name.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    services = {name: s for name, s in load_state(folder).items() if s.alive()}
    wanted = [name for name, on in (("ray", ray), ("mlflow", mlflow)) if on and name not in services]
    ports.check_free(tuple(p for name in wanted for p in PORTS_OF[name]))
    health = {}
    try:  # both start side by side (each takes 10-20 s), then both are waited for
        if "mlflow" in wanted:
            services["mlflow"], health["mlflow"] = _start_mlflow(folder, ports, mlflow_store or folder / "mlflow")
            _save_state(folder, services)  # recorded at once: `down` can stop it whatever happens next
        if "ray" in wanted:
            tracking = services["mlflow"].url if "mlflow" in services else None  # started just above, or kept
            services["ray"], health["ray"] = _start_ray(folder, ports, num_cpus, tracking)
            _save_state(folder, services)
        for name, checks in health.items():
            for url, statuses in checks:
                _wait_http(services[name], url, timeout, statuses)
    except BaseException:
        for name in health:
            _stop(services.pop(name), 30.0)  # leave nothing half-started behind
        _save_state(folder, services)
        raise
    _write_env(folder, services)
    return services


def _start_mlflow(folder: Path, ports: Ports, store: Path) -> tuple[Service, list[tuple[str, tuple[int, ...]]]]:
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{ports.mlflow}"
    argv = [
        _venv_bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(ports.mlflow),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        # Artifacts are proxied by the server: trials on any node upload over HTTP, no shared disk needed.
        "--artifacts-destination", str(store / "artifacts"),
        "--workers", "2",
        # uvicorn's supervisor kills a worker that misses a 5 s health ping and starts another; on a
        # loaded 2-core machine every new worker is still importing MLflow at 5 s, so the server
        # restarted workers for minutes and never answered (28 restarts in 300 s at load 18).
        "--uvicorn-opts", f"--timeout-worker-healthcheck {WORKER_HEALTHCHECK_S}",
    ]  # fmt: skip
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    return _spawn("mlflow", argv, folder / "mlflow-server.log", url, env), [(f"{url}/health", (200,))]


def _start_ray(
    folder: Path, ports: Ports, num_cpus: int | None, tracking: str | None
) -> tuple[Service, list[tuple[str, tuple[int, ...]]]]:
    url = f"http://{LOOPBACK}:{ports.dashboard}"
    agent = _free_loopback_port()  # Ray's default (52365) would clash between two heads on one machine
    argv = [
        _venv_bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", LOOPBACK, "--port", str(ports.ray),
        "--include-dashboard", "true", "--dashboard-host", LOOPBACK, "--dashboard-port", str(ports.dashboard),
        "--ray-client-server-port", str(ports.client), "--dashboard-agent-listen-port", str(agent),
    ]  # fmt: skip
    if num_cpus:
        argv += ["--num-cpus", str(num_cpus)]
    token = ensure_ray_token(ray_bin=_venv_bin("ray"))  # `ray start` dies without one (unlike ray.init)
    env = os.environ | token.env() | {
        # On Linux Ray swaps 127.0.0.1 for the machine's network address and binds its GCS and
        # raylets to it; this switch (meant for laptops) keeps every Ray port on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Explicit token auth; `ray job submit` must set the same mode and read the same token (env.sh).
        "RAY_AUTH_MODE": "token",
        # Job entrypoints run with the head's environment: `wsss` and `ray` resolve to this venv.
        "PATH": f"{Path(_venv_bin('ray')).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking  # a job's `wsss sweep` logs to this server by default
    service = _spawn("ray", argv, folder / "ray-head.log", url, env)
    service.extra = {
        "gcs_address": f"{LOOPBACK}:{ports.ray}",
        "client_address": f"ray://{LOOPBACK}:{ports.client}",
        "auth_token": token.describe(),
        **({"auth_token_path": str(token.path)} if token.path else {}),
    }
    # /api/version answers (401 with token auth) once the dashboard is up; a job is only accepted once
    # the head's dashboard agent answers too (before, `ray job submit` gets "No available agent").
    return service, [(f"{url}/api/version", (200, 401)), (f"http://{LOOPBACK}:{agent}/api/healthz", (200, 401))]


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _venv_bin(tool: str) -> str:
    """The tool installed next to this Python (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name(tool)
    return str(local) if local.exists() else tool


def _spawn(name: str, argv: list[str], log: Path, url: str, env: dict[str, str]) -> Service:
    import psutil

    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # fmt: skip
    return Service(name, proc.pid, psutil.Process(proc.pid).create_time(), url, str(log), argv)


def _wait_http(service: Service, url: str, timeout: float, ok_statuses: tuple[int, ...]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            log = service.log
            raise ServiceError(f"{service.name} exited while starting; last lines of {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status in ok_statuses:
                    return
        except urllib.error.HTTPError as err:
            if err.code in ok_statuses:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServiceError(
        f"{service.name} did not answer at {url} within {timeout:g} s (stopped it); see {service.log}"
        " (on a busy machine start-up is slower: raise --timeout)"
    )


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_env(folder: Path, services: dict[str, Service]) -> None:
    lines = ["# source this file to talk to the services started by `wsss services up`"]
    if "ray" in services:
        ray = services["ray"]
        lines += ["export RAY_AUTH_MODE=token", f"export RAY_API_SERVER_ADDRESS={ray.url}"]
        if "auth_token_path" in ray.extra:  # the token the head started with (never the token itself)
            lines.append(f"export RAY_AUTH_TOKEN_PATH={shlex.quote(ray.extra['auth_token_path'])}")
    if "mlflow" in services:
        lines.append(f"export MLFLOW_TRACKING_URI={services['mlflow'].url}")
    atomic_write_text(Path(folder) / ENV_FILE, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- down


def down(folder: Path, *, timeout: float = 60.0) -> list[str]:
    """Stop every service recorded in ``folder`` (Ray first: its jobs may still log to MLflow).

    Returns:
        Lines describing what was stopped, for the CLI.
    """
    folder = Path(folder).resolve()
    services = load_state(folder)
    if not services:
        return [f"nothing recorded in {folder / STATE_FILE}; nothing stopped"]
    said = []
    for name in sorted(services, key=lambda n: n != "ray"):
        service = services[name]
        if not service.alive():
            said.append(f"{name}: pid {service.pid} had already stopped")
        else:
            how = _stop(service, timeout)
            said.append(f"{name}: stopped process group {service.pid} ({how})")
        if name == "ray":
            _forget_current_cluster(service.extra.get("gcs_address", ""))
        del services[name]
        _save_state(folder, services)
    (folder / STATE_FILE).unlink(missing_ok=True)
    (folder / ENV_FILE).unlink(missing_ok=True)
    return said


def _forget_current_cluster(gcs_address: str) -> None:
    """Remove Ray's "latest cluster" pointer if it names ours, as `ray stop` does.

    A bare ``ray.init()`` joins the cluster this file names; left behind, it would point
    every later local Ray program at a cluster that no longer exists.
    """
    from ray._common.utils import get_ray_address_file  # private, but what `ray stop` uses

    pointer = Path(get_ray_address_file(None))
    try:
        if gcs_address and pointer.read_text().strip() == gcs_address:
            pointer.unlink()
    except OSError:
        pass


def _stop(service: Service, timeout: float) -> str:
    """Stop one service's process group; returns how.

    The leader gets SIGTERM first: ``ray start --block`` then drains its node and stops the
    processes it started, the MLflow server its web workers. Whatever of the group outlives
    its leader gets SIGTERM, then SIGKILL. Only our own session's group is ever signalled.
    """
    if service.alive():
        os.kill(service.pid, signal.SIGTERM)
    _wait(lambda: not service.alive(), timeout)
    if _group_gone(service.pid, 2.0):
        return "SIGTERM"
    for sig, wait, how in ((signal.SIGTERM, 10.0, "SIGTERM, then to its group"), (signal.SIGKILL, 10.0, "SIGKILL")):
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            return how
        if _group_gone(service.pid, wait):
            return how
    return "SIGKILL (some processes did not exit)"


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _group_gone(pgid: int, timeout: float) -> bool:
    def gone() -> bool:
        _reap(pgid)
        return not group_members(pgid)

    return _wait(gone, timeout)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: zombies wait on a parent to reap them."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _reap(pid: int) -> None:
    """Collect our own child's exit status (when `up` ran in this process) so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def describe(services: dict[str, Service]) -> list[str]:
    """Human-readable lines: what runs where, and how to use it."""
    lines = []
    if "ray" in services:
        ray = services["ray"]
        lines += [
            f"ray     {'up' if ray.alive() else 'DOWN'}  pid {ray.pid}  dashboard {ray.url}  "
            f"GCS {ray.extra.get('gcs_address', '?')}  log {ray.log}",
            f"  auth: {ray.extra.get('auth_token', '?')}",
            f"  submit: source {Path(ray.log).parent / ENV_FILE} && "
            f"ray job submit --address {ray.url} --working-dir . -- wsss sweep ...",
        ]
    if "mlflow" in services:
        ml = services["mlflow"]
        lines += [f"mlflow  {'up' if ml.alive() else 'DOWN'}  pid {ml.pid}  {ml.url}  log {ml.log}"]
    return lines
