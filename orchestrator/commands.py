"""Sweep-level subcommands: validate, sweep, tables, ui."""

from __future__ import annotations

import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from training.errors import ConfigError

VERBOSE_HELP = (
    "also Ray's, Tune's and MLflow's own output (INFO logs, Tune's tables, the trials' output); "
    "default: their warnings, and a line per trial with a bar for the sweep"
)


def add_sweep_commands(sub) -> None:
    """Register the sweep subcommands on the ``wsss`` parser."""
    v = sub.add_parser("validate", help="check a search space and count its trials, without Ray")
    v.add_argument("space", type=Path)
    v.add_argument("overrides", nargs="*", help="key=value overrides of the base trial config")
    v.add_argument("--list", action="store_true", help="also list every trial")
    v.set_defaults(run=run_validate)

    s = sub.add_parser("sweep", help="run a search space under Ray Tune, tracked in MLflow")
    s.add_argument("space", type=Path)
    s.add_argument("overrides", nargs="*", help="key=value overrides of the base trial config")
    s.add_argument("--name", help="sweep name (default: the file's `name`)")
    s.add_argument("--storage", type=Path, default=Path("runs"), help="folder for sweep outputs (default: ./runs)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    s.add_argument("--address", help="an existing Ray cluster: auto or host:port (default: start a local Ray)")
    s.add_argument("--storage-is-shared", action="store_true", help="--storage is mounted on every node (NFS)")
    s.add_argument("--resume", action="store_true", help="require an existing sweep of this name to resume")
    s.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    s.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    s.set_defaults(run=run_sweep_command)

    r = sub.add_parser("refine", help="refine a sweep's CAMs (CRF, SAM, superpixels) with Ray actors")
    r.add_argument("name")
    r.add_argument("--trials", help="best:K, all, or id,id (default: the sweep file's refine.trials)")
    r.add_argument("--space", type=Path, help="sweep file whose refine: section to use (default: the sweep's own)")
    r.add_argument("--storage", type=Path, default=Path("runs"))
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    r.add_argument("--address", help="an existing Ray cluster (default: start a local Ray)")
    r.add_argument("--verbose", action="store_true", help="Ray's own INFO logs and the actors' output too")
    r.set_defaults(run=run_refine)

    t = sub.add_parser("tables", help="print a sweep's tables from MLflow")
    t.add_argument("name")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    t.set_defaults(run=run_tables)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for this folder's store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--tracking-uri", help="backend store (default: sqlite:///<cwd>/mlflow.db)")
    u.set_defaults(run=run_ui)
    add_services_commands(sub)


def add_services_commands(sub) -> None:
    """``wsss services up|down|status|screenshot``: a local Ray head and MLflow server on 127.0.0.1."""
    from orchestrator.services import UP_TIMEOUT_S, Ports

    d = Ports()
    svc = sub.add_parser("services", help="start/stop a local Ray head (Jobs API) and MLflow server on 127.0.0.1")
    cmds = svc.add_subparsers(title="services commands")
    up = cmds.add_parser("up", help="start both (or one) and wait until they answer")
    up.add_argument("--only", choices=["ray", "mlflow"], help="start only this service")
    up.add_argument("--ray-port", type=int, default=d.ray, help=f"Ray GCS port (default {d.ray})")
    up.add_argument("--dashboard-port", type=int, default=d.dashboard, help=f"Jobs API (default {d.dashboard})")
    up.add_argument("--client-port", type=int, default=d.client, help=f"Ray Client server (default {d.client})")
    up.add_argument("--mlflow-port", type=int, default=d.mlflow, help=f"MLflow server (default {d.mlflow})")
    up.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    up.add_argument("--mlflow-store", type=Path, help="sqlite database + artifacts folder (default: DIR/mlflow)")
    up.add_argument("--timeout", type=float, default=UP_TIMEOUT_S,
                    help=f"seconds to wait for each service to answer (default {UP_TIMEOUT_S:g})")  # fmt: skip
    down = cmds.add_parser("down", help="stop exactly the processes `up` started")
    status = cmds.add_parser("status", help="what runs, where, and how to submit to it")
    shot = cmds.add_parser("screenshot", help="save a headless-Chromium picture of a sweep's parent run in the UI")
    shot.add_argument("name", help="sweep name")
    shot.add_argument("--out", type=Path, required=True, help="PNG to write")
    shot.add_argument("--tracking-uri", help="http:// MLflow server (default: the one `up` started)")
    for p, run in ((up, run_services_up), (down, run_services_down), (status, run_services_status),
                   (shot, run_services_screenshot)):  # fmt: skip
        p.add_argument("--dir", type=Path, default=Path(".wsss"), help="state, logs and env.sh (default: ./.wsss)")
        p.set_defaults(run=run)


def _tracking_uri(given: str | None) -> str:
    from orchestrator.tracking import default_tracking_uri

    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())


def run_validate(args) -> int:
    from orchestrator.space import check_checkpoints, expand, load_space

    space = load_space(args.space, args.overrides)
    trials = expand(space)
    check_checkpoints(trials)
    arms = Counter(t.config.transfer.paradigm for t in trials)
    for warning in space.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if space.search is not None:
        print(f"{args.space}: valid; sweep {space.name!r} {_search_budget(space, len(trials))}")
    else:
        print(f"{args.space}: valid; sweep {space.name!r} expands to {len(trials)} trials")
    print("  by paradigm: " + ", ".join(f"{k} {v}" for k, v in sorted(arms.items())))
    r = space.resources
    print(f"  per trial: cpu={r.cpu:g} gpu={r.gpu:g}; max concurrent: {space.max_concurrent or 'unlimited'}")
    print(f"  tables: {', '.join(t.name for t in space.tables) or 'none'}")
    if space.refine:
        print(f"  refinement pipelines: {len(space.refine.pipelines)}")
    ours = sorted({pair for t in trials if (pair := _our_pair(t.config))})
    if ours:
        listed = ", ".join(f"{m}·{lv}" for m, lv in ours)
        print(f"  transfer pairs without a thesis reference (ours): {listed}")
    if args.list:
        for t in trials:
            mark = "  [ours: no thesis reference]" if _our_pair(t.config) else ""
            print(f"  {t.id}: {t.run_name}{mark}")
    return 0


def _search_budget(space, known: int) -> str:
    """How a search spends its budget, e.g. ``searches 12 trials: 2 known points, then 10 suggested ...``."""
    s = space.search
    keys = ", ".join(space.sample)
    scheduler = f"; {space.scheduler.type} on {space.scheduler.metric}" if space.scheduler.type != "none" else ""
    return (
        f"searches {s.num_trials} trials: {known} known point(s) (grid × include) first, then "
        f"{s.num_trials - known} suggested by {s.algorithm} over {keys}; {s.mode} {s.metric}, seed {s.seed}, "
        f"{s.startup_trials} random startup trials{scheduler}"
    )


def _our_pair(cfg) -> tuple[str, str] | None:
    """The trial's (metric, level) when it has a transfer term the thesis's code does not define."""
    from training.config.names import pair_origin

    t = cfg.transfer
    if not t.paradigm_info.transfer or pair_origin(t.metric, t.level) == "thesis":
        return None
    return t.metric, t.level


def quiet_mlflow(verbose: bool) -> None:
    """MLflow's own logging at warnings unless ``verbose`` (or the user set MLFLOW_LOGGING_LEVEL).

    Read when MLflow is first imported, so called before that: otherwise a new
    database prints "Creating initial MLflow database tables" and more at INFO.
    """
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def run_sweep_command(args) -> int:
    quiet_mlflow(args.verbose)
    from orchestrator.cluster import check_job_outputs
    from orchestrator.driver import print_outcome, require_sweep, run_sweep
    from orchestrator.space import load_space
    from orchestrator.sweep_dir import SweepDir

    check_job_outputs(args.storage, bool(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    space = load_space(args.space, args.overrides)
    for warning in space.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    name = args.name or space.name
    if args.resume:
        require_sweep(SweepDir.of(args.storage, name))
    command = shlex.join(["wsss", *sys.argv[1:]]) if sys.argv[1:] else "wsss sweep ..."
    try:
        outcome = run_sweep(
            space,
            name=name,
            storage=args.storage,
            tracking_uri=(uri := _tracking_uri(args.tracking_uri)),
            address=args.address,
            storage_is_shared=args.storage_is_shared,
            num_cpus=args.num_cpus,
            verbose=args.verbose,
        )
    except KeyboardInterrupt:
        print(f"\nsweep {name}: interrupted; UNFINISHED: resume with\n  {command}", file=sys.stderr)
        return 130
    print_outcome(outcome, command=command)
    if outcome.complete:
        print(f"\n{_browse_hint(uri, name)}")
    print(f"\n{outcome.reading}", end="")  # the finding, last
    return 0 if outcome.complete else 3


def _browse_hint(uri: str, name: str) -> str:
    """Where to look next: the parent run's page on a server, else how to start the UI."""
    if not uri.startswith("http"):
        return "browse every run:  wsss ui   (then open http://127.0.0.1:5000)"
    return f"browse the sweep:  {sweep_page_url(uri, name)}"


def run_refine(args) -> int:
    quiet_mlflow(args.verbose)
    from orchestrator.cluster import RaySession
    from orchestrator.console import is_terminal
    from orchestrator.refine_sweep import refine_sweep
    from orchestrator.space import load_space
    from orchestrator.sweep_dir import SweepDir
    from orchestrator.tracking import SweepTracking

    sweep = SweepDir.of(args.storage, args.name)
    space_file = args.space or sweep.space_file
    space = load_space(space_file)
    if not space.refine:
        raise ConfigError(f"{space_file}: no `refine:` section; pass --space with one")
    tracking = SweepTracking.find(_tracking_uri(args.tracking_uri), args.name)
    with sweep.lock(), RaySession(args.address, verbose=args.verbose) as ray:  # not beside a driver of the same sweep
        ray.start()
        tables = refine_sweep(space.refine, sweep, tracking, trials=args.trials, progress=is_terminal(sys.stderr))
    for title, text in tables.items():
        print(f"## {title}\n\n{text}\n")
    return 0


def run_tables(args) -> int:
    from orchestrator.tables import read_tables

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout to the tables
    tables = read_tables(_tracking_uri(args.tracking_uri), args.name)
    if not tables:
        raise ConfigError(f"sweep {args.name!r}: no tables logged yet (has any trial finished?)")
    for title, text in tables.items():
        print(f"## {title}\n\n{text}\n")
    return 0


def run_ui(args) -> int:
    """Replace this process with ``mlflow ui`` bound to loopback."""
    uri = _tracking_uri(args.tracking_uri)
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(args.port), "--backend-store-uri", uri]
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    os.execv(argv[0], argv)
    return 0


def resolve_sweep_trial(name: str, trial_id: str | None, storage: Path | None) -> tuple[Path, str | None]:
    """The resolved config of one trial of a sweep, written to a YAML file to rerun.

    Returns:
        (config path, teacher checkpoint or None).
    """
    from orchestrator.sweep_dir import SweepDir

    sweep = SweepDir.of(storage or Path("runs"), name)
    out = sweep.write_rerun_config(trial_id)
    return out, sweep.load_trials()[trial_id]["config"]["transfer"]["teacher_checkpoint"] or None


# ---------------------------------------------------------------- services


def run_services_up(args) -> int:
    from orchestrator import services as sv

    ports = sv.Ports(args.ray_port, args.dashboard_port, args.client_port, args.mlflow_port)
    started = sv.up(args.dir, ports=ports, ray=args.only in (None, "ray"), mlflow=args.only in (None, "mlflow"),
                    num_cpus=args.num_cpus, mlflow_store=args.mlflow_store, timeout=args.timeout)  # fmt: skip
    print("\n".join(sv.describe(started)))
    print(f"environment for clients: source {args.dir / sv.ENV_FILE}")
    print(f"stop them with: wsss services down --dir {args.dir}")
    return 0


def run_services_down(args) -> int:
    from orchestrator import services as sv

    print("\n".join(sv.down(args.dir)))
    return 0


def run_services_status(args) -> int:
    from orchestrator import services as sv

    found = sv.load_state(args.dir)
    print("\n".join(sv.describe(found)) or f"no services recorded in {args.dir}")
    return 0 if found and all(s.alive() for s in found.values()) else 1


def run_services_screenshot(args) -> int:
    from orchestrator import services as sv
    from orchestrator.browser import capture

    server = sv.load_state(args.dir).get("mlflow")
    uri = args.tracking_uri or (server.url if server else os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri or not uri.startswith("http"):
        raise ConfigError(f"--tracking-uri: need the http:// URL of an MLflow server, got {uri!r} (wsss services up)")
    url = sweep_page_url(uri, args.name)
    shot = capture(url, args.out, expect=(f"sweep:{args.name}", "trials finished"), click=("Show more",))
    print(f"{shot.png}: {url}")
    return 0


def sweep_page_url(tracking_uri: str, name: str) -> str:
    """The MLflow UI page of a sweep's parent run."""
    from orchestrator.tracking import SweepTracking

    tracking = SweepTracking.find(tracking_uri, name)
    return run_page_url(tracking_uri, tracking.experiment_id, tracking.parent_run_id)


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run, in the UI's model-training view."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
