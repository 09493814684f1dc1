"""The sweep driver SIGKILLed mid-sweep, a second driver started while the first runs, a full disk.

One tiny sweep of three trials, one at a time, driven like a user would in
subprocesses: trial 000 finishes, trial 001 is held right after its first epoch
(``fault_plugin``'s ``hold``). Then

1. a second ``wsss sweep`` of the same sweep is started: it must refuse at once,
   naming the running driver (host, pid, start time) and how to take over;
2. the first driver is SIGKILLed (as the OOM killer would: no handler runs):
   its local Ray goes with it, its lock and its RUNNING MLflow runs stay;
3. the same command is rerun: it takes over the stale lock, reuses the orphaned
   runs, trains only trial 001 (from its checkpoint when Tune had recorded
   one), then trial 002, whose disk fills up after its first epoch
   (``storage_full``: a write hook raising ENOSPC, see `test_storage_full.py`
   for a real small filesystem): its next checkpoint cannot be written, in its
   retry either, and the sweep ends unfinished, naming the file and the space;
4. the space is freed and the command rerun: trial 002 goes on from its intact
   epoch-1 checkpoint. The sweep ends with one FINISHED run per trial, one
   metric point per epoch, and no finished trial trained again.

Slow: about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import psutil
import pytest
import torch
import yaml
from conftest import tiny_config_dict
from fault_plugin import DISK_FULL_MARKER, fault_env, held_marker
from test_faults import _finish, _runs, _wait_for, _wsss

from orchestrator.services import group_members
from training.trial_dir import STATE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def killed(tmp_path_factory, synth_root) -> dict:
    folder = tmp_path_factory.mktemp("killed")
    space = {"name": "killed", "base": tiny_config_dict(synth_root), "grid": {"name": ["done", "killed", "full"]},
             "resources": {"cpu": 1}, "max_concurrent": 1, "max_failures": 1}  # fmt: skip
    (folder / "killed.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    env = fault_env("hold:001-killed:1,storage_full:002-full:1")
    root = folder / "runs" / "killed"
    args = ("sweep", "killed.yaml", "--num-cpus", "2")
    seen: dict = {"folder": folder, "root": root}

    first = _wsss(folder, *args, env=env, start_new_session=True)  # its own group: Ray's processes are found by it
    _wait_for(lambda: held_marker(root / "trials" / "001-killed", 1).exists(), first)
    seen["lock_before"] = json.loads((root / "driver.lock").read_text())
    start = time.monotonic()
    seen["second"] = _finish(_wsss(folder, *args, env=env), timeout=120)
    seen["second_s"] = time.monotonic() - start

    seen["done_stamp"] = (root / "trials" / "000-done" / "metrics.json").stat().st_mtime_ns
    worker = json.loads(held_marker(root / "trials" / "001-killed", 1).read_text())["pid"]  # trial 001's process
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    deadline = time.monotonic() + 120
    while _running(worker) and time.monotonic() < deadline:  # its raylet died with the driver
        time.sleep(0.5)
    seen["worker_left_running"] = _running(worker)
    for pid in group_members(first.pid):  # Ray's agents notice their raylet is gone more slowly: not ours to wait for
        os.kill(pid, signal.SIGKILL)
    seen["lock_after_kill"] = json.loads((root / "driver.lock").read_text())
    _, parent, children = _runs(folder, "killed")
    seen["statuses_after_kill"] = {t: [r.info.status for r in runs] for t, runs in children.items()}
    seen["parent_after_kill"] = parent.info.status

    seen["rerun"] = _finish(_wsss(folder, *args, env=env), timeout=400)
    full = root / "trials" / "002-full"
    seen["full_checkpoint"] = sorted(p.name for p in (full / "checkpoint").iterdir())
    seen["full_epoch"] = torch.load(full / "checkpoint" / STATE_FILE, weights_only=True)["epoch"]
    _, _, children = _runs(folder, "killed")
    seen["full_run"] = children["002-full"]
    seen["stamps"] = {t: (root / "trials" / t / "metrics.json").stat().st_mtime_ns for t in ("000-done", "001-killed")}

    (full / DISK_FULL_MARKER).unlink()  # the user frees space
    seen["freed"] = _finish(_wsss(folder, *args, env=env), timeout=400)
    return seen


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie waits to be reaped: it is gone
    except psutil.NoSuchProcess:
        return False


def test_a_second_driver_refuses_at_once_naming_the_first(killed):
    code, out = killed["second"]
    lock = killed["lock_before"]
    assert code == 2, out
    assert f"error: sweep killed is already being run by another driver: pid {lock['pid']} on host " \
           f"{socket.gethostname()}, started {time.strftime('%Y-%m-%d', time.localtime(lock['started']))}" in out, out
    assert "command: " in out and "killed.yaml" in out
    assert f"delete {killed['root'] / 'driver.lock'} and rerun" in out
    assert killed["second_s"] < 60  # refused before Ray starts: only the imports and the plan (~10 s here)
    assert "Ray" not in out  # nothing started


def test_a_sigkilled_driver_takes_its_ray_with_it_and_leaves_a_stale_lock(killed):
    assert not killed["worker_left_running"]  # no trial of the dead driver goes on writing beside the rerun
    assert killed["lock_after_kill"]["pid"] == killed["lock_before"]["pid"]  # no handler ran
    assert killed["statuses_after_kill"] == {  # the driver makes every run before Tune starts: 002's waits
        "000-done": ["FINISHED"], "001-killed": ["RUNNING"], "002-full": ["RUNNING"]}  # fmt: skip
    assert killed["parent_after_kill"] == "RUNNING"


def test_the_rerun_takes_over_and_trains_only_what_was_missing(killed):
    code, out = killed["rerun"]
    pid = killed["lock_before"]["pid"]
    assert f"took over the lock {killed['root'] / 'driver.lock'} of the driver pid {pid} on host" in out, out
    assert f"pid {pid} is no longer running on this host" in out
    assert "2 MLflow run(s) left RUNNING by a driver that did not close them (killed?): 001-killed, 002-full; " \
           "each is reused by its trial" in out, out  # fmt: skip
    assert (killed["root"] / "trials" / "000-done" / "metrics.json").stat().st_mtime_ns == killed["done_stamp"]
    assert (killed["root"] / "trials" / "001-killed" / "metrics.json").is_file()
    assert code == 3, out  # trial 002 could not write its checkpoint


def test_a_full_disk_names_the_file_and_the_space_and_keeps_the_previous_checkpoint(killed):
    _, out = killed["rerun"]
    state = killed["root"] / "trials" / "002-full" / "checkpoint" / STATE_FILE
    assert "2/3 trials finished" in out, out
    assert f"error: 002-full: StorageFull: {state}: cannot write it: no space left on device (" in out, out
    assert re.search(r"\(\d+(\.\d)? [KMGT]?i?B free of \d+(\.\d)? [KMGT]?i?B on its filesystem\); the previous "
                     r"state\.pt is intact", out), out  # fmt: skip
    assert "UNFINISHED: resume with" in out
    assert killed["full_checkpoint"] == [STATE_FILE] and killed["full_epoch"] == 1  # no partial file, epoch 1 kept
    (run,) = killed["full_run"]
    assert run.info.status == "FAILED" and "StorageFull" in run.data.tags["wsss.failure"]


def test_once_space_is_freed_the_rerun_finishes_with_one_run_per_trial(killed):
    code, out = killed["freed"]
    assert code == 0, out
    assert "3/3 trials finished" in out
    assert not (killed["root"] / "driver.lock").exists()
    for trial, stamp in killed["stamps"].items():  # finished trials are not trained again
        assert (killed["root"] / "trials" / trial / "metrics.json").stat().st_mtime_ns == stamp
    client, parent, children = _runs(killed["folder"], "killed")
    assert parent.info.status == "FINISHED"
    assert {t: [r.info.status for r in runs] for t, runs in children.items()} == {
        "000-done": ["FINISHED"], "001-killed": ["FINISHED"], "002-full": ["FINISHED"]}  # fmt: skip
    for (run,) in children.values():  # epochs trained twice (a resume, a retry) are logged once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
