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
