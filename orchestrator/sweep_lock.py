"""One driver per sweep: a lock file in the sweep's own storage folder.

``wsss sweep`` and ``wsss refine`` hold ``<storage>/<name>/driver.lock``
(`SweepDir.lock`) while they run. A second driver of the same sweep refuses at
once, naming the one that runs (host, pid, start time, command) and saying how
to take over if it is dead.

The lock is a file beside the sweep's results, so drivers on different login
nodes of a cluster see it (the storage is shared), and it outlives a SIGKILL of
its holder, since no handler runs then. A lock is therefore not trusted forever:
it is stale, and taken over with a message, when

- its holder ran on this host and that process is gone (its pid is not alive,
  or is alive but started at another time: the pid was reused);
- its holder ran on another host and its heartbeat, rewritten every
  ``heartbeat_s`` by a daemon thread, is older than ``stale_after_s``
  (the hosts' clocks are compared, so keep them in sync: NTP).

Taking the lock is atomic on a local disk and on NFS: the record is written to
a temporary file that is then hard-linked to the lock's name (``link`` fails
when the name exists), so no reader ever sees half a record.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from training.atomic import atomic_write_json
from training.errors import WsssError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0  # four missed heartbeats


class SweepLocked(WsssError):
    """Another driver runs this sweep (named in the message, with how to take over)."""


@dataclass(frozen=True)
class LockRecord:
    """Who holds a sweep's lock: what the lock file holds.

    Attributes:
        host: the holder's host name.
        pid: the holder's process id on ``host``.
        proc_started: the holder process's start time (epoch seconds): tells a reused pid apart.
        started: when it took the lock (epoch seconds).
        heartbeat: when it last said it is alive (epoch seconds).
        command: its command line.
        token: unique per holding, so a holder never removes another's lock.
    """

    host: str
    pid: int
    proc_started: float
    started: float
    heartbeat: float
    command: str
    token: str

    @classmethod
    def mine(cls, command: str | None = None) -> LockRecord:
        """A record for this process, now."""
        now = time.time()
        command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        return cls(socket.gethostname(), os.getpid(), _proc_started(os.getpid()) or now, now, now, command,
                   uuid.uuid4().hex)  # fmt: skip

    def describe(self, now: float | None = None) -> str:
        """``pid 123 on host h, started 2026-12-01 10:00:00 (last heartbeat 4 s ago), command: ...``."""
        age = (now or time.time()) - self.heartbeat
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return (f"pid {self.pid} on host {self.host}, started {started} "
                f"(last heartbeat {age:.0f} s ago), command: {self.command}")  # fmt: skip


def stale_reason(
    record: LockRecord, *, host: str, now: float, stale_after_s: float, alive: Callable[[int, float], bool]
) -> str | None:
    """Why a lock's holder is taken for dead, or None while it may be alive.

    Args:
        record: the lock's holder.
        host: this host's name.
        now: the current time (epoch seconds).
        stale_after_s: how old another host's heartbeat may get.
        alive: ``alive(pid, proc_started)`` tells whether that process runs on this host.
    """
    if record.host == host:
        if alive(record.pid, record.proc_started):
            return None
        return f"pid {record.pid} is no longer running on this host"
    age = now - record.heartbeat
    if age <= stale_after_s:
        return None
    return f"its heartbeat is {age:.0f} s old (a live driver renews it every {HEARTBEAT_S:g} s)"


def process_alive(pid: int, proc_started: float) -> bool:
    """True while process ``pid`` of this host runs and is the one started at ``proc_started``."""
    started = _proc_started(pid)
    return started is not None and abs(started - proc_started) < 1.0


def _proc_started(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.NoSuchProcess:
        return None


class SweepLock:
    """The lock of one sweep, held for the lifetime of a ``with`` block.

    Args:
        path: the lock file (`SweepDir.lock_file`).
        sweep: the sweep's name, for messages.
        command: the holder's command line (default: this process's).
        heartbeat_s: how often the holder rewrites its heartbeat.
        stale_after_s: how old another host's heartbeat may get before its lock is taken over.

    Attributes:
        took_over: the holder this driver took the lock from (it was dead), or None.
    """

    def __init__(self, path: Path, sweep: str, *, command: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:  # fmt: skip
        self.path = Path(path)
        self.sweep = sweep
        self.command = command
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.took_over: LockRecord | None = None
        self.record: LockRecord | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; start the heartbeat.

        Raises:
            SweepLocked: a live driver holds it (named, with how to take over).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = LockRecord.mine(self.command)
        if not self._link(record):
            held = self.read()
            reason = held and stale_reason(held, host=record.host, now=time.time(),
                                           stale_after_s=self.stale_after_s, alive=process_alive)  # fmt: skip
            if held is not None and not reason:
                raise SweepLocked(self._refusal(held))
            if not self._take_over(held, record):
                raise SweepLocked(self._refusal(self.read() or held))
            print(f"sweep {self.sweep}: took over the lock {self.path} of the driver {held.describe() if held else '?'}"
                  f"; {reason or 'its lock file was unreadable'}", file=sys.stderr)  # fmt: skip
            self.took_over = held
        self.record = record
        self._beat = threading.Thread(target=self._heartbeat, name="sweep-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.record is not None and self._ours():
            self.path.unlink(missing_ok=True)
        self.record = None

    def read(self) -> LockRecord | None:
        """The lock's holder, or None when there is no lock or it is unreadable."""
        return _read_record(self.path)

    def _refusal(self, held: LockRecord) -> str:
        return (
            f"sweep {self.sweep} is already being run by another driver: {held.describe()}. "
            f"Wait for it to end, or stop it (Ctrl-C, or kill -INT {held.pid} on {held.host}). "
            f"If it is dead (its machine was lost), delete {self.path} and rerun; a driver that died on this host "
            f"is noticed at once, and one on another host once its heartbeat is {self.stale_after_s:g} s old"
        )

    def _link(self, record: LockRecord) -> bool:
        """Create the lock holding ``record``, atomically; False when it exists."""
        tmp = self.path.with_name(f".{self.path.name}.{record.token}")
        try:
            tmp.write_text(json.dumps(asdict(record)))
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: LockRecord | None, record: LockRecord) -> bool:
        """Move the stale lock aside and take the lock; False when another driver was faster."""
        aside = self.path.with_name(f"{self.path.name}.stale-{record.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._link(record)  # its holder ended meanwhile
        moved = _read_record(aside)
        if stale is not None and (moved is None or moved.token != stale.token):
            try:  # we moved a fresh lock another driver had just taken: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._link(record)

    def _ours(self) -> bool:
        held = self.read()
        return held is not None and self.record is not None and held.token == self.record.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():
                print(f"sweep {self.sweep}: lost the lock {self.path} to another driver", file=sys.stderr)
                return
            self.record = replace(self.record, heartbeat=time.time())
            try:
                atomic_write_json(self.path, asdict(self.record))
            except OSError:
                pass  # a full or flaky disk; the next beat tries again


def _read_record(path: Path) -> LockRecord | None:
    try:
        return LockRecord(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None
