"""A worker node lost mid-sweep, on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``).

The head holds no CPU (it only runs the driver, as a login node would); worker
nodes are added per test and removed with ``remove_node(allow_graceful=False)``,
which kills the node's raylet and every worker process on it, as a preempted or
crashed machine loses them. The sweep's storage is one local folder all nodes of
this machine see, declared shared (as NFS would be).

- A trial held after epoch 1 (``fault_plugin``'s ``hold``) loses its node. Tune
  retries it on the surviving node from its epoch-1 checkpoint; it ends with the
  metrics of an undisturbed trial of the same seed, in its one MLflow run.
- A refinement actor's node is lost mid-unit: its unit is redone once on the
  other node, and the tables equal a clean run's.
- The only node that can hold a trial (the GPU-sized one) is lost: the sweep
  says so at once, waits ``resources.wait_for_node_s``, and stops the Ctrl-C way.

Slow: about two minutes on 2 cores (nodes start in a few seconds each; Ray
notices a dead node after its health checks fail, a few seconds with the
settings below).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import tiny_config_dict
from fault_plugin import fault_env, held_marker, release
from test_server_restart import _trial_runs, assert_same_histories

from orchestrator.driver import run_sweep
from orchestrator.space import load_space

pytestmark = pytest.mark.slow

# Declare a killed node dead after ~3 missed 1 s health checks (Ray's default is 5 × 3 s).
HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
NODE = {"object_store_memory": 100 * 1024 * 1024}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator:
    """A head without CPUs; the trials' fault hooks in every raylet's environment (nodes inherit ours)."""
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update(fault_env("hold:001-lost:1,hold:000-only:1"))
    head = {**NODE, "num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def workers(cluster, *resources: dict) -> Iterator[list]:
    """Add worker nodes (one per ``resources``); remove whichever are still alive afterwards."""
    nodes = [cluster.add_node(**NODE, **r) for r in resources]
    cluster.wait_for_nodes()
    try:
        yield nodes
    finally:
        for node in nodes:
            if node in cluster.worker_nodes:
                cluster.remove_node(node, allow_graceful=False)


def _lose_node_when_held(cluster, trial: Path, epoch: int, lost: dict) -> None:
    """In a thread: once ``trial`` holds after ``epoch``, kill the node it runs on."""
    deadline = time.monotonic() + 300
    marker = held_marker(trial, epoch)
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    held = json.loads(marker.read_text())
    (node,) = [n for n in cluster.worker_nodes if n.node_id == held["node_id"]]
    cluster.remove_node(node, allow_graceful=False)
    _gone_with_its_node(held["pid"])
    lost.update(node_id=node.node_id, pid=held["pid"])
    release(trial, epoch)  # nothing is left to release: the process died with its node


def _gone_with_its_node(pid: int, wait_s: float = 10.0) -> None:
    """A lost machine takes all its processes; here a worker can outlive its killed raylet a while.

    Left alive and released, it would go on training and report to the driver
    directly (seen once: the trial finished on the "lost" node), so it is killed
    as the machine's loss would have.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        process.wait(timeout=wait_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with suppress(psutil.NoSuchProcess):
            process.kill()


def _space(folder: Path, synth_root: Path, name: str, labels: list[str], resources: dict) -> Path:
    import yaml

    space = {"name": name, "base": tiny_config_dict(synth_root), "grid": {"name": labels},
             "resources": resources, "max_concurrent": 2, "max_failures": 1}  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _sweep(cluster, space: Path, storage: Path, uri: str):
    return run_sweep(load_space(space), name=load_space(space).name, storage=storage, tracking_uri=uri,
                     address=cluster.address, storage_is_shared=True)  # fmt: skip


def test_a_trial_whose_node_is_lost_resumes_on_the_survivor_with_the_same_metrics(cluster, tmp_path, synth_root):
    import threading

    shared, uri = tmp_path / "shared", f"sqlite:///{tmp_path}/mlflow.db"
    space = _space(tmp_path, synth_root, "lost", ["calm", "lost"], {"cpu": 1})
    trial = shared / "lost" / "trials" / "001-lost"
    lost: dict = {}
    with workers(cluster, {"num_cpus": 1}, {"num_cpus": 1}) as nodes:
        killer = threading.Thread(target=_lose_node_when_held, args=(cluster, trial, 1, lost), daemon=True)
        killer.start()
        outcome = _sweep(cluster, space, shared, uri)
        killer.join(timeout=5)
        survivors = {n.node_id for n in cluster.worker_nodes} & {n.node_id for n in nodes}

    assert lost, "the held trial's node was never removed"
    assert outcome.complete and sorted(outcome.status.finished) == ["000-calm", "001-lost"]
    runs = _trial_runs(uri)  # asserts one run per trial
    assert sorted(runs) == ["000-calm", "001-lost"]
    calm, moved = runs["000-calm"], runs["001-lost"]
    assert calm["status"] == moved["status"] == "FINISHED"
    assert moved["tags"]["ray.node_id"] in survivors and moved["tags"]["ray.node_id"] != lost["node_id"]
    # Resumed from the epoch-1 checkpoint (not retrained from scratch), and the same training:
    assert_same_histories(moved, calm)  # one point per epoch, the same values
    metrics = {t: json.loads((shared / "lost" / "trials" / t / "metrics.json").read_text()) for t in runs}
    numbers = {t: {k: v for k, v in m.items() if isinstance(v, float) and not k.endswith("_s")}
               for t, m in metrics.items()}  # fmt: skip
    assert numbers["001-lost"] == pytest.approx(numbers["000-calm"]) and numbers["000-calm"]


def test_refinement_units_of_a_lost_node_are_redone_once(cluster, tmp_path, monkeypatch, synth_root):
    import ray
    from test_faults import _fake_trial, assert_one_unit_redone_once, fault_the_next_busy_actor
    from test_refine import CRF, _table

    from orchestrator.refine import make_units, refine_reference, refine_units, summarise

    for copy in ("clean", "lost"):
        _fake_trial(tmp_path / copy / "trial-a", synth_root)
    reference = refine_reference(make_units({"trial-a": tmp_path / "clean" / "trial-a"}, [CRF]))

    def lose_its_node(actor: dict) -> dict:
        (node,) = [n for n in cluster.worker_nodes if n.node_id == actor["Address"]["NodeID"]]
        cluster.remove_node(node, allow_graceful=False)
        return {"node_id": node.node_id}

    lost = fault_the_next_busy_actor(monkeypatch, lose_its_node)
    with workers(cluster, {"num_cpus": 1}, {"num_cpus": 1}):
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            units = make_units({"trial-a": tmp_path / "lost" / "trial-a"}, [CRF])  # 3 shards × (seed, CRF)
            results = refine_units(units, cpu_actors=2, progress=False)
        finally:
            ray.shutdown()
    assert lost, "no node was lost"
    assert_one_unit_redone_once(results, units, lost["index"])
    assert lost["node_id"] not in {r.node for r in results if r.attempts == 2}  # redone on the survivor
    assert _table(summarise(results)) == _table(summarise(reference))  # nothing counted twice


def test_losing_the_only_node_that_holds_a_trial_waits_then_stops(cluster, tmp_path, synth_root, capfd):
    import threading

    shared, uri = tmp_path / "shared", f"sqlite:///{tmp_path}/mlflow.db"
    # A logical GPU (Ray only counts it; the trial trains on the CPU): the one node a trial fits on.
    space = _space(tmp_path, synth_root, "gpu", ["only"], {"cpu": 1, "gpu": 1, "wait_for_node_s": 8})
    trial = shared / "gpu" / "trials" / "000-only"
    lost: dict = {}
    with workers(cluster, {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 2}):
        killer = threading.Thread(target=_lose_node_when_held, args=(cluster, trial, 1, lost), daemon=True)
        killer.start()
        start = time.monotonic()
        outcome = _sweep(cluster, space, shared, uri)
        seconds = time.monotonic() - start
        killer.join(timeout=5)
    err = capfd.readouterr().err
    assert lost and not outcome.complete
    assert "sweep gpu: waiting: no live node can hold a trial now (each trial asks for cpu=1, gpu=1, but the " \
           "largest of the 2 live node(s) has cpu=2, gpu=0)" in err  # fmt: skip
    assert "no live node could hold a trial for 8 s (resources.wait_for_node_s): stopping the sweep" in err
    assert seconds < 240  # it stopped; it did not wait for the trial forever
    run = _trial_runs(uri)["000-only"]
    assert run["status"] == "KILLED"  # closed the Ctrl-C way, to resume with the same command
    assert any(shared.rglob("state.pt"))  # the epoch-1 checkpoint is kept, to resume from
