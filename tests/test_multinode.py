"""A simulated two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets on this machine,
one CPU each) with the sweep's storage on a local folder both nodes see, as NFS would be.

Checks that a sweep refuses storage it is not told is shared, and that when it is, trials and
refinement units really land on both nodes (each trial tags its MLflow run with its node; the
refinement records which node refined each unit). Slow: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cluster import ClusterError
from orchestrator.driver import run_sweep
from orchestrator.space import load_space

pytestmark = pytest.mark.slow

CHECK = Path(__file__).resolve().parents[1] / "search_spaces" / "check.yaml"


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    cluster.add_node(**small)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.list_all_nodes()}


def test_local_storage_is_refused_on_two_nodes_unless_declared_shared(cluster, tmp_path):
    with pytest.raises(ClusterError, match="2 nodes but --storage is a local path"):
        run_sweep(load_space(CHECK), name="refused", storage=tmp_path / "runs",
                  tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", address=cluster.address)  # fmt: skip
    assert not (tmp_path / "runs" / "refused" / "trials").exists()  # refused before any training


def test_trials_and_refinement_units_land_on_both_nodes(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import SweepTracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    shared = tmp_path / "shared"  # one folder every node of this machine sees
    outcome = run_sweep(load_space(CHECK), name="two-nodes", storage=shared, tracking_uri=uri,
                        address=cluster.address, storage_is_shared=True)  # fmt: skip
    assert outcome.complete and len(outcome.status.finished) == 2
    nodes = _node_ids(cluster)

    tracking = SweepTracking.find(uri, "two-nodes")
    trial_nodes = {run.data.tags["ray.node_id"] for run in tracking.child_runs()}
    assert trial_nodes == nodes  # two trials, one CPU per node: one trial on each

    marker = json.loads((shared / "two-nodes" / "refine.json").read_text())
    unit_nodes = set(marker["nodes"].values())
    assert len(marker["nodes"]) == 18  # 2 trials × 3 shards × (seed + 2 CRF scales)
    assert unit_nodes == nodes  # the actor pool spread over both nodes
    parent = MlflowClient(uri).get_run(tracking.parent_run_id)
    assert parent.data.tags["wsss.refine_nodes"].count("units") == 2
