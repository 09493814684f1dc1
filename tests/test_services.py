"""`wsss services`: ports, the state file, stopping exactly our process groups; job-safety checks;
the parent run's description. Fast: no Ray, no MLflow server (those are in test_cluster_e2e.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import services as sv
from orchestrator.cluster import ClusterError, check_job_outputs, in_ray_job, job_cluster
from orchestrator.summary import NOTE_BUDGET, sweep_markdown
from training.errors import ConfigError

# A leader that starts a child in its own process group, as `ray start --block` does.
SLEEPER = "import time; time.sleep(300)"
LEADER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(300)"


def test_a_taken_port_is_refused_naming_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(sv.ServiceError, match=rf"port {port} .* --mlflow-port"):
            sv.Ports(mlflow=port).check_free(("mlflow",))


def test_a_port_out_of_range_is_refused():
    with pytest.raises(sv.ServiceError, match="--dashboard-port 70000"):
        sv.Ports(dashboard=70000).check_free(("dashboard",))


def test_a_broken_state_file_is_named(tmp_path: Path):
    (tmp_path / sv.STATE_FILE).write_text("{not json")
    with pytest.raises(sv.ServiceError, match=str(tmp_path / sv.STATE_FILE)):
        sv.load_state(tmp_path)


def test_a_reused_pid_is_not_ours():
    import psutil

    me = psutil.Process()
    ours = sv.Service("x", os.getpid(), me.create_time(), "", "", [])
    reused = sv.Service("x", os.getpid(), me.create_time() - 3600, "", "", [])
    assert ours.alive() and not reused.alive()


def test_down_stops_exactly_the_recorded_group(tmp_path: Path):
    """The leader and its child go; a process outside the group, started the same way, stays."""
    log = tmp_path / "leader.log"
    leader = sv._spawn("ray", [sys.executable, "-c", LEADER], log, "http://127.0.0.1:1", dict(os.environ))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        sv._save_state(tmp_path, {"ray": leader})
        _wait_until(lambda: len(sv.group_members(leader.pid)) == 2)
        said = sv.down(tmp_path, timeout=20)
        assert said == [f"ray: stopped process group {leader.pid} (SIGTERM, then to its group)"]
        assert sv.group_members(leader.pid) == []
        assert bystander.poll() is None  # untouched
        assert not (tmp_path / sv.STATE_FILE).exists()
        assert sv.down(tmp_path) == [f"nothing recorded in {tmp_path.resolve() / sv.STATE_FILE}; nothing stopped"]
    finally:
        bystander.kill()
        bystander.wait()


def test_down_reports_a_service_that_already_stopped(tmp_path: Path):
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    sv._save_state(tmp_path, {"mlflow": sv.Service("mlflow", proc.pid, started, "", "", [])})
    assert sv.down(tmp_path) == [f"mlflow: pid {proc.pid} had already stopped"]


def _wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


# ---------------------------------------------------------------- inside `ray job submit`


@pytest.fixture
def in_job(monkeypatch):
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))


def test_outside_a_job_anything_goes(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not in_ray_job()
    check_job_outputs(Path("runs"), tracking_uri_given=False)


def test_a_job_refuses_outputs_in_its_temporary_working_dir(in_job):
    assert in_ray_job()
    with pytest.raises(ConfigError, match="--storage runs: inside a Ray job"):
        check_job_outputs(Path("runs"), tracking_uri_given=True)
    with pytest.raises(ConfigError, match="--tracking-uri: inside a Ray job"):
        check_job_outputs(Path("/shared/runs"), tracking_uri_given=False)
    check_job_outputs(Path("/shared/runs"), tracking_uri_given=True)


def test_a_job_joins_its_cluster_but_not_a_dashboard_url(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert job_cluster() == "127.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ClusterError, match=r"RAY_ADDRESS=http://127\.0\.0\.1:8265 is a dashboard"):
        job_cluster()
    monkeypatch.delenv("RAY_ADDRESS")
    assert job_cluster() is None


# ---------------------------------------------------------------- the parent run's description


def _markdown(tables: dict[str, str], **kw) -> str:
    best = {"run_name": "teacher_student · cosine · global · λ=1", "miou": 0.4737, "accuracy": 0.91}
    args = dict(description="A sweep.", finished=3, total=4, failed=["003-x"], best=best, rank_by="miou",
                tables=tables, plot_url=lambda n: f"get-artifact?path=plots%2F{n}.png", plots={"paradigms"})
    return sweep_markdown(**(args | kw))


def test_the_description_leads_with_progress_best_trial_and_tables():
    text = _markdown({"paradigms": "| arm | miou |\n|---|---|\n| ts | 47.4 |", "results": "| id |\n|---|\n| a |"})
    assert text.startswith("A sweep.\n\n**3/4 trials finished**, 1 failed (003-x)")
    assert "**Best by miou:** teacher_student · cosine · global · λ=1 (miou 0.4737, accuracy 0.91)" in text
    assert "### paradigms\n\n| arm | miou |" in text
    assert "![paradigms](get-artifact?path=plots%2Fparadigms.png)" in text  # the heatmap, inline
    assert "![results]" not in text  # no plot of that name
    assert text.index("### paradigms") < text.index("### results")


def test_the_description_fits_mlflow_tag_limit_and_says_what_it_left_out():
    big = "| x |\n|---|\n" + "| 0.123456789 |\n" * 600
    text = _markdown({"paradigms": "| a |\n|---|\n| 1 |", "results": big, "refine": "| r |\n|---|\n| 2 |"})
    assert len(text) <= NOTE_BUDGET
    assert "### paradigms" in text and "### refine" in text and "### results" not in text
    assert "*Too long to show here: results.*" in text


def test_a_sweep_without_finished_trials_has_no_best_line():
    text = _markdown({}, finished=0, failed=[], best=None)
    assert "Best by" not in text and "**0/4 trials finished**" in text


def test_a_service_that_dies_at_start_is_reported_with_its_log_and_not_recorded(tmp_path: Path, monkeypatch):
    # `python server --host ...` exits at once (no such file): as a broken mlflow install would.
    monkeypatch.setattr(sv, "_venv_bin", lambda tool: sys.executable)
    port = sv.Ports(mlflow=_free_port())
    with pytest.raises(sv.ServiceError, match=r"mlflow exited while starting; last lines of .*mlflow-server\.log"):
        sv.up(tmp_path, ports=port, ray=False, mlflow=True, timeout=30)
    assert sv.load_state(tmp_path) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
