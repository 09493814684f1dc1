"""One driver per sweep: the lock in the sweep's folder (`orchestrator.sweep_lock`).

The holder is a real second process, killed with SIGKILL as the OOM killer
would: no handler runs, its lock file stays, and the next driver must tell it
is dead. A holder on another host is simulated by its record (its host name and
heartbeat), since its pid means nothing here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from orchestrator.sweep_lock import LockRecord, SweepLock, SweepLocked, process_alive, stale_reason

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from orchestrator.sweep_lock import SweepLock
with SweepLock(sys.argv[1], "s", command="wsss sweep s.yaml"):
    print("held", flush=True)
    time.sleep(600)
"""


def _record(**changes) -> LockRecord:
    return replace(LockRecord("node-a", 4242, 1000.0, 1000.0, 1000.0, "wsss sweep s.yaml", "t0"), **changes)


def _holder(lock: Path) -> subprocess.Popen:
    """A process that holds ``lock`` until killed; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.parametrize(
    ("record", "alive", "expected"),
    [
        (_record(), True, None),  # this host, running
        (_record(), False, "pid 4242 is no longer running on this host"),
        (_record(host="node-b", heartbeat=1000.0 - 120), False, None),  # another host: 120 s ≤ 120 s, trusted
        (_record(host="node-b", heartbeat=1000.0 - 121), True, "its heartbeat is 121 s old"),  # alive() not asked
    ],
    ids=["here-alive", "here-dead", "there-fresh", "there-stale"],
)
def test_stale_reason(record, alive, expected):
    reason = stale_reason(record, host="node-a", now=1000.0, stale_after_s=120.0, alive=lambda pid, t: alive)
    assert reason is None if expected is None else reason.startswith(expected)


def test_a_reused_pid_is_not_the_holder():
    me = os.getpid()
    import psutil

    started = psutil.Process(me).create_time()
    assert process_alive(me, started)
    assert not process_alive(me, started - 5)  # same pid, another process (started 5 s earlier): reused
    assert not process_alive(2**22 + 1, started)  # above Linux's pid_max: no such process


def test_a_second_driver_is_refused_naming_the_first_then_takes_over_once_it_is_sigkilled(tmp_path, capsys):
    lock = tmp_path / "sweep" / "driver.lock"
    holder = _holder(lock)
    try:
        with pytest.raises(SweepLocked) as refused, SweepLock(lock, "s"):
            pass
        held = json.loads(lock.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["started"]))
        message = str(refused.value)
        assert f"sweep s is already being run by another driver: pid {holder.pid} on host {socket.gethostname()}, " \
               f"started {started}" in message  # fmt: skip
        assert "command: wsss sweep s.yaml" in message
        assert f"kill -INT {holder.pid} on {socket.gethostname()}" in message
        assert f"If it is dead (its machine was lost), delete {lock} and rerun" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no handler runs: the lock file stays
        holder.wait(timeout=10)
    assert json.loads(lock.read_text())["pid"] == holder.pid

    with SweepLock(lock, "s", command="wsss sweep again") as taken:
        assert taken.took_over.pid == holder.pid
        assert json.loads(lock.read_text())["command"] == "wsss sweep again"
    err = capsys.readouterr().err
    assert f"sweep s: took over the lock {lock} of the driver pid {holder.pid}" in err
    assert f"pid {holder.pid} is no longer running on this host" in err
    assert not lock.exists()  # released on exit
    assert [p.name for p in lock.parent.iterdir()] == []  # no temporary or moved-aside file left


def test_another_hosts_lock_is_trusted_while_it_beats_and_taken_over_once_silent(tmp_path, capsys):
    lock = tmp_path / "driver.lock"
    there = _record(host="login-2", started=time.time() - 600, heartbeat=time.time() - 5)
    lock.write_text(json.dumps(asdict(there)))
    with pytest.raises(SweepLocked, match=r"pid 4242 on host login-2, .* \(last heartbeat 5 s ago\)"):
        SweepLock(lock, "s", stale_after_s=60).acquire()
    lock.write_text(json.dumps(asdict(replace(there, heartbeat=time.time() - 61))))
    with SweepLock(lock, "s", stale_after_s=60) as taken:
        assert taken.took_over.host == "login-2"
    assert "its heartbeat is 61 s old" in capsys.readouterr().err


def test_the_holder_renews_its_heartbeat_and_never_removes_anothers_lock(tmp_path):
    lock = tmp_path / "driver.lock"
    mine = SweepLock(lock, "s", heartbeat_s=0.05)
    mine.acquire()
    first = json.loads(lock.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(lock.read_text())["heartbeat"] > first
    other = replace(LockRecord.mine("another driver"), token="theirs")  # taken over while we stalled
    lock.write_text(json.dumps(asdict(other)))
    mine.release()
    assert json.loads(lock.read_text())["token"] == "theirs"


def test_an_unreadable_lock_is_taken_over(tmp_path, capsys):
    lock = tmp_path / "driver.lock"
    lock.write_text('{"host": "a", "pi')  # cut short: a disk that filled up under an older version
    with SweepLock(lock, "s") as taken:
        assert taken.took_over is None
    assert "its lock file was unreadable" in capsys.readouterr().err
