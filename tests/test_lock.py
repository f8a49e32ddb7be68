"""One coordinator per output directory: the lock refuses a second holder and dies with its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.lock import OutputLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from coordinator.lock import OutputLock; "
    "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def holder(out: Path) -> subprocess.Popen:
    """Another process that takes the lock on ``out`` and sleeps; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as info:
            OutputLock(tmp_path).acquire()
        message = str(info.value)
        assert f"coordinator pid {proc.pid} on host" in message and "\n" not in message
        assert f"output_dir={tmp_path}" in message
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # the kernel drops the lock with the process; no waiting on timers
    while True:
        try:
            lock = OutputLock(tmp_path).acquire()
            break
        except RunLocked:
            assert time.time() < deadline
            time.sleep(0.1)
    lock.release()


def test_released_on_exit_and_taken_again(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(RunLocked):
            OutputLock(tmp_path).acquire()  # a second open file in the same process is refused too
    with OutputLock(tmp_path):
        pass


# ---- one coordinator per run: the run store's coordinator lease ------------------------------------
LEASE = (
    "import sys, time; from coordinator.lock import RunLease; from worker.store import RedisStore; "
    "RunLease(RedisStore(sys.argv[1]), 'r1', ttl=float(sys.argv[2])).acquire(); print('held', flush=True); "
    "time.sleep(600)"
)


def lease_holder(url: str, ttl: float = 30.0) -> subprocess.Popen:
    """Another process that holds run r1's coordinator lease in Redis at ``url``; returns once it does."""
    proc = subprocess.Popen([sys.executable, "-c", LEASE, url, str(ttl)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_coordinator_of_a_run_is_refused_naming_the_live_one(redis_url):
    from coordinator.lock import RunLease
    from worker.store import RedisStore

    proc = lease_holder(redis_url, ttl=1.5)
    try:
        time.sleep(3)  # two ttls: it is renewing, not merely holding a fresh lease
        with pytest.raises(RunLocked) as info:
            RunLease(RedisStore(redis_url), "r1").acquire()
        message = str(info.value)
        assert message.startswith(f"run r1: coordinated by coordinator pid {proc.pid} on host ")
        assert "resume=r1" in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_coordinators_run_is_taken_over_on_its_host_at_once(redis_url):
    from coordinator.lock import RunLease
    from worker.store import RedisStore

    proc = lease_holder(redis_url, ttl=600)  # its lease would outlive this test
    proc.kill()
    proc.wait()
    store = RedisStore(redis_url)
    with RunLease(store, "r1") as lease:
        assert store.r.get("dblocks:r1:coordinator:lease") == lease.owner
    assert store.r.get("dblocks:r1:coordinator:lease") is None  # released on exit


def test_the_lease_of_a_coordinator_elsewhere_is_waited_for_until_it_lapses():
    from coordinator.lock import RunLease
    from worker.store import MemoryStore

    store = MemoryStore()
    store.acquire("r1", "coordinator", '{"host": "elsewhere", "pid": 1}', ttl=0.5)
    with pytest.raises(RunLocked, match="coordinated by coordinator pid 1 on host elsewhere"):
        RunLease(store, "r1").acquire()
    time.sleep(1.0)  # lapsed
    RunLease(store, "r1").acquire().release()
