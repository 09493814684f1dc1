"""The user's whole path with the real components: `wsss services up` (a Ray head with the Jobs
API and an MLflow server on 127.0.0.1), `ray job submit --working-dir . -- wsss sweep ...`, the
results read back over MLflow's REST API as the UI reads them, the UI itself in a headless
Chromium, then `wsss services down`, which must leave none of the started processes behind.

Slow (about 2 minutes on 2 cores). The browser check needs Chromium: it is skipped when none is
installed, unless WSSS_REQUIRE_BROWSER=1 (set by .ci/run after installing it).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from ray._common.utils import get_ray_address_file

from orchestrator import services as sv
from orchestrator.browser import capture, find_browser
from orchestrator.commands import run_page_url

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SWEEP = "e2e-job"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wsss(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "wsss"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _sourced(env_sh: Path) -> dict[str, str]:
    """The variables `source .wsss/env.sh` exports (what a user's shell gets)."""
    found = {}
    for line in env_sh.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            found[key] = shlex.split(value)[0]
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Services up on a machine that never ran Ray (an empty HOME: no ~/.ray/auth_token), the check
    sweep submitted as a Ray job the README's way (`source .wsss/env.sh`), finished; services down."""
    folder = tmp_path_factory.mktemp("services")
    home = tmp_path_factory.mktemp("never-ran-ray")
    user = os.environ | {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ray_port, dashboard, client, mlflow = _free_ports(4)
    ports = ["--ray-port", str(ray_port), "--dashboard-port", str(dashboard), "--client-port", str(client)]
    up = _wsss("services", "up", "--dir", str(folder), *ports, "--mlflow-port", str(mlflow), "--num-cpus", "2",
               env=user)  # fmt: skip
    state = sv.load_state(folder)  # read before asserting: whatever started is stopped below
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        sourced = _sourced(folder / sv.ENV_FILE)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", state["ray"].url, "--working-dir", ".", "--",
             "wsss", "sweep", "search_spaces/check.yaml", "--name", SWEEP,
             "--storage", str(folder / "runs"), "--tracking-uri", state["mlflow"].url],
            cwd=REPO, env=user | sourced, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        yield {"folder": folder, "state": state, "job": job, "mlflow": state["mlflow"].url, "home": home,
               "up": up, "sourced": sourced}  # fmt: skip
    finally:
        down = _wsss("services", "down", "--dir", str(folder), timeout=180, env=user)
        leftovers = {name: sv.group_members(s.pid) for name, s in state.items()}
        assert down.returncode == 0, down.stdout + down.stderr
        assert leftovers == {name: [] for name in state}, f"processes left running: {leftovers}"
        # Ray's "latest cluster" pointer is gone too: a later bare ray.init() must not look for it.
        pointer = Path(get_ray_address_file(None))
        assert not (pointer.is_file() and pointer.read_text().strip() == f"127.0.0.1:{ray_port}")


def _get(base: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as reply:
        return json.load(reply)


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


def _artifact(base: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as reply:
        return reply.read()


def _listing(base: str, run_id: str, path: str = "") -> set[str]:
    return {f["path"] for f in _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])}


@pytest.fixture(scope="module")
def runs(deployment) -> dict:
    """The experiment, the sweep's parent run and its children, over REST."""
    base = deployment["mlflow"]
    assert deployment["job"].returncode == 0, deployment["job"].stdout[-4000:] + deployment["job"].stderr[-4000:]
    exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="wsss-sweeps")["experiment"]
    found = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})
    by_tag = [(r, {t["key"]: t["value"] for t in r["data"].get("tags", [])}) for r in found["runs"]]
    (parent,) = [(r, t) for r, t in by_tag if t.get("wsss.sweep") == SWEEP and t.get("wsss.role") == "parent"]
    children = [(r, tags) for r, tags in by_tag if tags.get("mlflow.parentRunId") == parent[0]["info"]["run_id"]]
    return {"base": base, "experiment": exp, "parent": parent, "children": children}


def test_services_up_created_the_token_that_the_head_and_job_submit_share(deployment):
    token = deployment["home"] / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) == 64
    assert token.stat().st_mode & 0o077 == 0  # a credential: readable by its owner only
    assert deployment["sourced"]["RAY_AUTH_MODE"] == "token"
    assert deployment["sourced"]["RAY_AUTH_TOKEN_PATH"] == str(token.resolve())
    assert f"token {token.resolve()} (created now)" in deployment["up"].stdout
    assert token.read_text() not in deployment["up"].stdout + deployment["up"].stderr  # never printed


def test_the_job_succeeded_and_pointed_at_the_sweep_page(deployment):
    job = deployment["job"]
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "sweep e2e-job: 2/2 trials finished, 0 failed" in job.stdout
    assert f"browse the sweep:  {deployment['mlflow']}/#/experiments/" in job.stdout


def test_the_experiment_opens_in_the_model_training_view(runs):
    tags = {t["key"]: t["value"] for t in runs["experiment"].get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_one_finished_child_per_trial_with_metrics_history_and_gallery(runs):
    base, children = runs["base"], runs["children"]
    assert sorted(r["info"]["run_name"] for r, _ in children) == [
        "co_training · cosine · global · λ=1",
        "teacher_student · cosine · global · λ=1",
    ]
    for run, tags in children:
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"miou", "miou_per_image", "accuracy", "context_activation", "loss"} <= metrics
        history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        assert [m["step"] for m in history] == [1, 2]  # one point per epoch
        assert tags["ray.node_ip"] == "127.0.0.1"  # the head binds loopback only
        gallery = sorted(_listing(base, run_id, "gallery"))
        assert gallery and _artifact(base, run_id, gallery[0]).startswith(b"\x89PNG")


def test_the_parent_run_holds_tables_plots_refinement_and_a_summary(runs):
    base, (parent, tags) = runs["base"], runs["parent"]
    run_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert {"tables/paradigms.md", "tables/results.csv"} <= _listing(base, run_id, "tables")
    assert _artifact(base, run_id, "plots/paradigms.png").startswith(b"\x89PNG")
    table = _artifact(base, run_id, "tables/paradigms.md").decode()
    assert "| teacher_student |" in table and "| co_training |" in table
    assert "refine/refine_miou_refined.md" in _listing(base, run_id, "refine")
    note = tags["mlflow.note.content"]
    assert note.startswith("Cluster check") and "**2/2 trials finished**" in note and "### paradigms" in note
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["trials_finished"] == 2 and 0 <= metrics["best_miou"] <= 1


def test_the_ui_shows_the_sweep_in_a_browser(runs, tmp_path):
    if find_browser() is None:
        if os.environ.get("WSSS_REQUIRE_BROWSER") == "1":
            pytest.fail("WSSS_REQUIRE_BROWSER=1 but no Chromium is installed")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    parent = runs["parent"][0]["info"]
    url = run_page_url(runs["base"], parent["experiment_id"], parent["run_id"])
    shot = capture(url, tmp_path / "sweep.png", expect=(f"sweep:{SWEEP}", "2/2 trials finished"), click=("Show more",))
    for seen in ("teacher_student · cosine · global · λ=1", "co_training · cosine · global · λ=1",
                 "Best by miou", "paradigms", "best_miou"):  # fmt: skip
        assert seen in shot.text
    assert shot.png.read_bytes().startswith(b"\x89PNG") and shot.png.stat().st_size > 20_000
