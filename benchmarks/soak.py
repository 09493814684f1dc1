"""Soak benchmark: one sweep of tiny trials run clean, then again with seeded random faults.

Builds a tiny synthetic dataset and a sweep file (``--trials`` tiny trials over
``train.seed``, two at a time, ``max_failures: 2``, a ``refine:`` section with
the thesis's dense CRF on every trial) under ``--out``, starts a real ``mlflow server``
on 127.0.0.1 for each run (``orchestrator.services.up``; stopped by its process
id in ``finally``), and runs ``wsss sweep`` as a user does, in a subprocess:

A. the clean sweep, timed;
B. the same sweep in a fresh folder and store, with faults drawn by
   ``random.Random(--seed)`` (`draw_faults`): ``crash_once`` on ``--crashes``
   random trials at random epochs; the MLflow server stopped (SIGTERM to its
   group) once a random number of trials has finished, left down a few seconds
   and restarted on the same port and store; the driver SIGINTed once another
   random number has finished, and the same command rerun; one refinement
   actor SIGKILLed once a random number of refinement units has finished (the
   actor is found among the driver's descendant processes by its process title,
   ``ray::RefineWorker``). B is timed from its first driver start to its last
   driver's exit, reruns and the server's downtime included.

Then it reads both MLflow stores and both folders and prints: trials, faults
injected and survived by kind, runs lost (a trial without a FINISHED child run
or without ``metrics.json``), runs duplicated (a trial with more than one child
run), trials whose ``metrics.json`` and metric histories equal the clean
sweep's, whether the refinement tables are equal, both wall times, their ratio
and the load average at start and end. It exits with 1 if a run is lost or
duplicated. The faults come through the product's one test seam, so this puts
``tests/`` on the drivers' PYTHONPATH (``tests/fault_plugin.py``) and on its own
``sys.path`` (the tiny config of ``tests/conftest.py``).

Usage::

    nice -n 10 .venv/bin/python benchmarks/soak.py                 # 24 trials, seed 0 (about 17 min on 2 shared cores)
    .venv/bin/python benchmarks/soak.py --trials 4 --crashes 1     # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SWEEP = "soak"
WALL_KEYS = ("_s", "per_s")  # metric names holding wall times: they differ between runs, the training does not
PIPELINES = [[{"step": "crf", "recipe": "thesis"}]]  # with the seed masks: 2 tables; 3 units per trial


@dataclass(frozen=True)
class FaultPlan:
    """The faults of run B, drawn once from a seed.

    Attributes:
        crashes: (trial id, epoch) pairs: the trial raises once right after that epoch.
        restart_after: finished trials after which the MLflow server is stopped.
        down_s: seconds the server stays down before it is restarted on the same store.
        sigint_after: finished trials after which the driver gets SIGINT and is rerun.
        kill_after_units: finished refinement units after which one actor is SIGKILLed.
    """

    crashes: tuple[tuple[str, int], ...]
    restart_after: int
    down_s: float
    sigint_after: int
    kill_after_units: int

    def inject(self) -> str:
        """The ``WSSS_FAULT_INJECT`` value of the crashes."""
        return ",".join(f"crash_once:{trial}:{epoch}" for trial, epoch in self.crashes)


def draw_faults(trial_ids: list[str], *, units: int, seed: int = 0, crashes: int = 4, epochs: int = 2) -> FaultPlan:
    """Draw run B's faults; the same arguments give the same plan.

    Args:
        trial_ids: the sweep's trials, in order (at least 4: two distinct thresholds fall mid-grid).
        units: refinement units of the sweep (trials × shards × pipelines).
        crashes: trials that crash once (at most all of them).
        epochs: epochs per trial; a crash follows one of them.
    Returns:
        A plan whose server restart and driver SIGINT fall at two different points of the grid.
    """
    if len(trial_ids) < 4:
        raise ValueError(f"draw_faults: expected at least 4 trials, got {len(trial_ids)}")
    rng = random.Random(seed)
    crashed = sorted(rng.sample(trial_ids, min(crashes, len(trial_ids))))
    restart_after, sigint_after = rng.sample(range(1, len(trial_ids) - 1), 2)
    return FaultPlan(
        crashes=tuple((trial, rng.randint(1, epochs)) for trial in crashed),
        restart_after=restart_after,
        down_s=round(rng.uniform(3.0, 10.0), 1),
        sigint_after=sigint_after,
        kill_after_units=rng.randint(1, max(1, units // 2)),
    )


# ---------------------------------------------------------------- one run: a folder, a server, its drivers


class Run:
    """One sweep folder with its own MLflow server, store, cache and Ray temp folder."""

    def __init__(self, folder: Path, space: dict, inject: str) -> None:
        from fault_plugin import _free_port

        from orchestrator.services import Ports

        self.folder, self.inject = folder, inject
        folder.mkdir(parents=True)
        (folder / f"{SWEEP}.yaml").write_text(json.dumps(space))  # JSON is YAML
        self.services, self.ports = folder / "services", Ports(mlflow=_free_port())
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="soak-ray-"))  # short: Ray's socket paths are limited
        self.trials = folder / "runs" / SWEEP / "trials"
        self.drivers: list[dict] = []
        self.uri = ""

    def server_up(self) -> None:
        from orchestrator.services import up

        self.uri = up(self.services, ports=self.ports, ray=False, timeout=600)["mlflow"].url

    def server_down(self) -> None:
        from orchestrator.services import down

        down(self.services)  # SIGTERM to the recorded process group, as `wsss services down` does

    def start_driver(self) -> subprocess.Popen:
        from fault_plugin import fault_env

        env = os.environ | fault_env(self.inject) | {
            "PYTHONUNBUFFERED": "1", "WSSS_CACHE": str(self.folder / "cache"), "RAY_TMPDIR": str(self.ray_tmp),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # a live but loaded server gets 60 s; a dead one refuses at once
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }  # fmt: skip
        log = (self.folder / f"driver-{len(self.drivers)}.log").open("w")
        args = [sys.executable, "-m", "orchestrator.cli", "sweep", f"{SWEEP}.yaml", "--tracking-uri", self.uri,
                "--num-cpus", "2"]  # fmt: skip
        proc = subprocess.Popen(args, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.drivers.append({"proc": proc, "log": log.name})
        return proc

    def finished(self) -> list[Path]:
        return sorted(self.trials.glob("*/metrics.json"))

    def units_done(self) -> int:
        return len(list(self.trials.glob("*/refine/*/*.counts.json")))

    def close(self) -> None:
        for driver in self.drivers:
            if driver["proc"].poll() is None:
                driver["proc"].kill()
                driver["proc"].wait()
        self.server_down()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_clean(run: Run) -> float:
    """Run A: one driver to the end; its wall seconds."""
    start = time.monotonic()
    proc = run.start_driver()
    proc.wait()
    run.drivers[-1]["code"] = proc.returncode
    return time.monotonic() - start


def run_faulty(run: Run, plan: FaultPlan, *, max_drivers: int = 4) -> tuple[float, dict]:
    """Run B: the driver, with the plan's faults caused when their points come; reruns until it ends with 0.

    Returns:
        (wall seconds of the whole, what was injected: {kind: details}).
    """
    injected: dict = {"crash_once": [], "server_restart": None, "driver_sigint": None, "actor_sigkill": None}
    start = time.monotonic()
    proc = run.start_driver()
    while True:
        done = len(run.finished())
        if injected["server_restart"] is None and done >= plan.restart_after:
            run.server_down()
            time.sleep(plan.down_s)
            run.server_up()  # the same port and store
            injected["server_restart"] = {"after_finished": done}
        if injected["driver_sigint"] is None and done >= plan.sigint_after and proc.poll() is None:
            stamps = {p: p.stat().st_mtime_ns for p in run.finished()}
            proc.send_signal(signal.SIGINT)
            proc.wait()
            run.drivers[-1]["code"] = proc.returncode
            injected["driver_sigint"] = {"after_finished": len(stamps), "code": proc.returncode, "stamps": stamps}
            proc = run.start_driver()  # the same command, as printed after UNFINISHED
        if injected["actor_sigkill"] is None and run.units_done() >= plan.kill_after_units:
            found = _refine_actor(proc.pid)
            if found is not None:
                os.kill(found[0], signal.SIGKILL)
                injected["actor_sigkill"] = {"pid": found[0], "title": found[1], "after_units": run.units_done()}
        if proc.poll() is not None:
            run.drivers[-1]["code"] = proc.returncode
            if proc.returncode == 0 or len(run.drivers) >= max_drivers:
                break
            proc = run.start_driver()  # e.g. MLflow was away when the grid ended: rerunning is the remedy
        time.sleep(0.1)
    wall = time.monotonic() - start
    if injected["actor_sigkill"] is not None:  # the death as the driver's Ray reported it
        logs = "".join(Path(d["log"]).read_text() for d in run.drivers)
        injected["actor_sigkill"]["seen"] = "worker died or was killed" in logs
    injected["crash_once"] = [t for t, _ in plan.crashes if (run.trials / t / ".injected-crash_once").exists()]
    return wall, injected


def _refine_actor(root: int) -> tuple[int, str] | None:
    """(pid, process title) of a refinement actor among ``root``'s descendants, or None.

    Ray titles an actor's process ``ray::RefineWorker`` (``ray::RefineWorker.run`` while it runs a unit).
    """
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    stack, found = [root], []
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        if titles.get(pid, "").startswith("ray::RefineWorker"):
            found.append((pid, titles[pid]))
    return min(found) if found else None


# ---------------------------------------------------------------- what both runs left


def read_runs(uri: str) -> tuple[int, dict[str, list[dict]]]:
    """(parent runs of the sweep, {trial id: its child runs}: status, tags, metric histories, artifacts)."""
    from mlflow.tracking import MlflowClient
    from test_server_restart import _artifacts

    from orchestrator.tracking import PARENT_TAG, ROLE_TAG, TRIAL_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("wsss-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = {r.info.run_id for r in runs if r.data.tags.get(ROLE_TAG) == "parent"}
    children: dict[str, list[dict]] = {}
    for run in runs:
        if run.data.tags.get(PARENT_TAG) not in parents:
            continue
        rid = run.info.run_id
        children.setdefault(run.data.tags[TRIAL_TAG], []).append({
            "status": run.info.status, "tags": run.data.tags,
            "history": {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
                        for k in run.data.metrics if not k.endswith(WALL_KEYS)},
            "artifacts": sorted(_artifacts(client, rid)),
        })  # fmt: skip
    return len(parents), children


def compare(clean: Run, faulty: Run, trial_ids: list[str]) -> dict:
    """The figures: lost, duplicated, equal to the clean sweep (metrics, histories, artifacts, tables)."""
    from orchestrator.offline import REPLAYED_TAG
    from orchestrator.sweep_dir import SweepDir

    (parents_a, runs_a), (parents_b, runs_b) = read_runs(clean.uri), read_runs(faulty.uri)

    def metrics(run: Run, trial: str) -> dict | None:
        path = run.trials / trial / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def one(runs: dict, trial: str) -> dict:
        return runs.get(trial, [{}])[0]

    def same(key: str) -> int:  # trials whose (first) run in B holds what the clean run's holds under key
        return sum(key in one(runs_a, t) and one(runs_a, t)[key] == one(runs_b, t).get(key) for t in trial_ids)

    def tables(run: Run) -> dict | None:
        path = SweepDir.of(run.folder / "runs", SWEEP).refine_marker
        return json.loads(path.read_text()).get("tables") if path.is_file() else None

    finished_b = {t for t, runs in runs_b.items() if any(r["status"] == "FINISHED" for r in runs)}
    equal = [t for t in trial_ids if metrics(clean, t) is not None and metrics(clean, t) == metrics(faulty, t)]
    return {
        "parents": (parents_a, parents_b),
        "lost": [t for t in trial_ids if metrics(faulty, t) is None or t not in finished_b],
        "lost_clean": [t for t in trial_ids if metrics(clean, t) is None],
        "duplicated": [t for t in trial_ids if len(runs_b.get(t, [])) > 1],
        "metrics_equal": len(equal),
        "metrics_differ": [t for t in trial_ids if t not in equal],
        "history_equal": same("history"),
        "artifacts_equal": same("artifacts"),
        "replayed": sorted(t for t in trial_ids if REPLAYED_TAG in one(runs_b, t).get("tags", {})),
        "tables_equal": tables(clean) is not None and tables(clean) == tables(faulty),
    }


# ---------------------------------------------------------------- the benchmark


def make_space(data: Path, trials: int) -> dict:
    """The sweep file: ``trials`` tiny trials (seeds), two at a time, every one refined by dense CRF."""
    from conftest import tiny_config_dict

    return {"name": SWEEP, "base": tiny_config_dict(data), "grid": {"train.seed": list(range(trials))},
            "resources": {"cpu": 1}, "max_concurrent": 2, "max_failures": 2,
            "refine": {"trials": "all", "pipelines": PIPELINES}}  # fmt: skip


def report(args, trial_ids: list[str], plan: FaultPlan, walls: tuple[float, float], injected: dict,
           figures: dict, faulty: Run, loads: tuple) -> None:  # fmt: skip
    sigint, kill = injected["driver_sigint"], injected["actor_sigkill"]
    untouched = sigint is not None and all(p.stat().st_mtime_ns == s for p, s in sigint["stamps"].items())
    complete = not figures["lost"] and not figures["duplicated"]
    n = len(trial_ids)
    survived = {  # each injected fault, and whether what it could have cost is there, once, as in the clean sweep
        "crash_once": [complete and t not in figures["metrics_differ"] for t in injected["crash_once"]],
        "server_restart": [complete and figures["history_equal"] == figures["artifacts_equal"] == n]
        if injected["server_restart"] else [],
        "driver_sigint": [complete and untouched] if sigint else [],
        "actor_sigkill": [figures["tables_equal"]] if kill else [],
    }  # fmt: skip
    rows = [
        ("trials", f"{len(trial_ids)} ({args.trials} seeds, 2 at a time, max_failures 2)"),
        ("fault plan (seed)", f"{args.seed}: {plan}"),
        ("crash_once (crashed / planned)", f"{len(injected['crash_once'])}/{len(plan.crashes)}: "
         f"{', '.join(injected['crash_once'])}"),
        ("server restart", f"{injected['server_restart']}, down {plan.down_s} s; journals replayed into "
                           f"{len(figures['replayed'])} run(s): {', '.join(figures['replayed']) or '-'}"),
        ("driver SIGINT", "not injected" if sigint is None else
         f"after {sigint['after_finished']} finished, exit {sigint['code']}; rerun; "
         f"{'no' if untouched else 'SOME'} finished trial retrained"),
        ("actor SIGKILL", "not injected (refinement ended before an actor was seen)" if kill is None else
         f"{kill['title']} after {kill['after_units']} units, death seen by Ray: {kill['seen']}; "
         f"refine tables equal: {figures['tables_equal']}"),
        ("faults injected / survived", f"{sum(map(len, survived.values()))} / {sum(map(sum, survived.values()))} ("
         + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in survived.items()) + ")"),
        ("driver runs (exit codes)", ", ".join(str(d.get("code")) for d in faulty.drivers)),
        ("runs lost (goal 0)", f"{len(figures['lost'])} {figures['lost'] or ''}"),
        ("runs duplicated (goal 0)", f"{len(figures['duplicated'])} {figures['duplicated'] or ''}"),
        ("parent runs A / B", f"{figures['parents'][0]} / {figures['parents'][1]}"),
        ("metrics.json equal to clean", f"{figures['metrics_equal']}/{len(trial_ids)}"),
        ("metric histories equal (no wall times)", f"{figures['history_equal']}/{len(trial_ids)}"),
        ("artifact listings equal", f"{figures['artifacts_equal']}/{len(trial_ids)}"),
        ("wall A (clean) / B (faults)", f"{walls[0]:.0f} s / {walls[1]:.0f} s"),
        ("extra wall time B/A", f"{walls[1] / walls[0]:.2f}x"),
        ("load avg 1 min: start / end", f"{loads[0]:.2f} / {loads[1]:.2f}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if figures["lost_clean"]:
        print(f"note: the clean sweep itself left {figures['lost_clean']} unfinished")
    print("result:", "PASS" if complete else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="tiny trials (one seed each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan")
    parser.add_argument("--crashes", type=int, default=4, help="trials that crash once")
    parser.add_argument("--out", type=Path, default=None, help="folder for both runs (default: a new temp folder)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(TESTS), str(REPO)]  # fault_plugin, conftest's tiny config, test_server_restart
    from conftest import TINY_SYNTH

    from orchestrator.space import expand
    from training.config.sweep import load_space
    from training.synth import generate

    out = (args.out or Path(tempfile.mkdtemp(prefix="wsss-soak-"))).resolve()
    loads = [os.getloadavg()[0]]
    print(f"soak: {args.trials} trials, fault seed {args.seed}, in {out}; load avg {loads[0]:.2f}", flush=True)
    space = make_space(generate(TINY_SYNTH, out / "data"), args.trials)
    clean = Run(out / "a-clean", space, inject="")
    trial_ids = [t.id for t in expand(load_space(clean.folder / f"{SWEEP}.yaml"))]
    shards = math.ceil(TINY_SYNTH.n_test / space["base"]["cam"]["shard_size"])
    plan = draw_faults(trial_ids, units=len(trial_ids) * shards * len(PIPELINES), seed=args.seed,
                       crashes=args.crashes, epochs=space["base"]["train"]["epochs"])  # fmt: skip
    faulty = Run(out / "b-faults", space, inject=plan.inject())
    try:
        clean.server_up()
        wall_a = run_clean(clean)
        print(f"A (clean): {wall_a:.0f} s, exit {clean.drivers[-1]['code']}", flush=True)
        faulty.server_up()
        wall_b, injected = run_faulty(faulty, plan)
        print(f"B (faults): {wall_b:.0f} s, exits {[d.get('code') for d in faulty.drivers]}", flush=True)
        figures = compare(clean, faulty, trial_ids)
    finally:
        for run in (clean, faulty):
            run.close()
    loads.append(os.getloadavg()[0])
    report(args, trial_ids, plan, (wall_a, wall_b), injected, figures, faulty, tuple(loads))
    return 1 if figures["lost"] or figures["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
