"""One coordinator per output directory and per run.

**Output directory**: an exclusive ``flock`` on ``<output_dir>/.lock``.

The coordinator takes it before it starts, stops or cleans up any service of the directory (the
embedded redis-server and its orphan cleanup, the sqlite MLflow store), and holds it to the end. A
second coordinator on the same directory (a second start, or ``resume=`` while the first still
runs) is refused in one line naming the holder's pid and host. The kernel drops a ``flock`` when
its process dies, however it dies, so a coordinator killed with SIGKILL never leaves a stale lock.

**Run**: two coordinators with different output directories can share a run store (``redis.url``)
and so a run (``resume=<run id>``). :class:`RunLease` holds the run's ``coordinator`` lease in the
store, renewed by a thread; a second coordinator of the run is refused in one line naming the live
one. A killed coordinator's lease is taken over at once on its own host (its pid is gone), and
lapses after ``ttl`` seconds elsewhere.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from dblocks.config import ConfigError
from worker.store import LeaseHeld, RunStore, StoreError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLocked(ConfigError):
    """Another live coordinator holds the output directory."""


class OutputLock:
    """``with OutputLock(out):`` holds ``out/.lock`` (pid, host and start time written inside)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLocked(
                f"output_dir={self.path.parent}: in use by {holder}; wait for that run to end or stop it "
                "(then resume=<run id>), or choose another output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the holder is gone; the file stays (unlinking it would race)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


COORDINATOR = "coordinator"  # the run-store lease's name, beside the blocks' leases


class RunLease:
    """``with RunLease(store, run_id):`` holds the run's coordinator lease, renewed every ``ttl / 3`` s."""

    def __init__(self, store: RunStore, run_id: str, ttl: float = 30.0):
        self.store, self.run_id, self.ttl = store, run_id, ttl
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.owner = json.dumps(me, sort_keys=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLease:
        try:
            self.store.acquire(self.run_id, COORDINATOR, self.owner, self.ttl)
        except LeaseHeld as e:
            holder = _parse(e.owner)
            if not _dead_here(holder):
                raise RunLocked(
                    f"run {self.run_id}: coordinated by {_describe(holder)}; wait for it to end or stop it "
                    f"(a stopped coordinator's lease lapses within {self.ttl:g} s), then resume={self.run_id}"
                ) from None
            self.store.release(self.run_id, COORDINATOR, e.owner)  # its process is gone: take over
            self.store.acquire(self.run_id, COORDINATOR, self.owner, self.ttl)
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.store.acquire(self.run_id, COORDINATOR, self.owner, self.ttl)
            except StoreError as e:  # Redis away, or the lease lapsed and was taken: say so, keep trying
                log.warning("run %s: cannot renew the coordinator lease (%s)", self.run_id, str(e).splitlines()[0])

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self.store.release(self.run_id, COORDINATOR, self.owner)
            except StoreError:  # the store is away: the lease lapses on its own
                pass

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(owner: str | None) -> dict:
    try:
        holder = json.loads(owner or "{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another coordinator"
    return f"coordinator pid {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
