"""One coordinator per output directory: an exclusive ``flock`` on ``<output_dir>/.lock``.

The coordinator takes it before it starts, stops or cleans up any service of the directory (the
embedded redis-server and its orphan cleanup, the sqlite MLflow store), and holds it to the end. A
second coordinator on the same directory (a second start, or ``resume=`` while the first still
runs) is refused in one line naming the holder's pid and host. The kernel drops a ``flock`` when
its process dies, however it dies, so a coordinator killed with SIGKILL never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dblocks.config import ConfigError

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


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another coordinator"
    return f"coordinator pid {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
