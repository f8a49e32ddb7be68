"""Redis outages against real redis-servers (AOF on), killed with SIGKILL and restarted on the same
port and data: every client rides them out within ``redis.reconnect_seconds`` and fails in one line
naming Redis after it; the embedded server's password, orphan cleanup and stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from services import ROOT

from coordinator.redis_server import EmbeddedRedis, free_port, stored_password
from dblocks.units import Shard, make_units
from helpers import TINY_DEBUG_JOB, wait_for
from worker.record import Job, JobId, Manifest
from worker.store import RedisStore, StoreError, keys

B0 = JobId("blocks", 0)
SECRET = "pl4nted-Redis-pw"


def _manifest(run: str) -> Manifest:
    from dblocks.levels import SigmaLevels
    from dblocks.plan import make_plan

    spec = make_plan(SigmaLevels(), 2, 6)[0]
    job = Job(B0, spec, "plan-abc", 5, "t-block0", "mlrun-0")
    return Manifest(run, "t", 1.5, {"seed": 0}, "/storage", [Shard("s", 100)], {B0: job}, "sqlite:///x.db", "parent")


class Server:
    """A redis-server with AOF on a fixed port and data dir, SIGKILLed and restarted on the same ones."""

    def __init__(self, data: Path, password: str | None = None):
        self.data, self.port, self.password = data, free_port(), password
        self.proc: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return EmbeddedRedis(self.data, self.port, self.password).url

    def start(self) -> Server:
        self.proc = EmbeddedRedis(self.data, self.port, self.password).start()
        return self

    def kill(self) -> None:
        self.proc.proc.kill()  # SIGKILL: no shutdown, no AOF flush beyond what the kernel holds
        self.proc.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "redis").start()
    yield s
    s.stop()


def test_calls_during_an_outage_go_through_once_redis_is_back(server):
    store = RedisStore(server.url, reconnect_seconds=120)
    units = make_units(50, 10, [Shard("s", 100)], seed=0, block=0)
    store.create_run(_manifest("r1"), {B0: units})
    store.create_run(_manifest("r2"), {B0: units[:1]})
    assert len(store.next_units("r2", B0, "w2", block_ms=None)) == 1  # r2's queue: nothing left to deliver
    store.acquire("r1", B0, "w", ttl=60)
    assert [u for _, u in store.claim_pending("r1", B0, "w")] == []
    first = store.next_units("r1", B0, "w", count=4, block_ms=None)
    assert [u.seq for _, u in first] == [0, 1, 2, 3]

    # a blocking read in flight when Redis dies: it waits for Redis, not fails
    blocked: dict = {}

    def read_blocking() -> None:
        try:
            blocked["units"] = store.next_units("r2", B0, "w2", count=1, block_ms=3000)
        except BaseException as e:  # noqa: BLE001 (the assertion below names it)
            blocked["error"] = e

    reader = threading.Thread(target=read_blocking)
    reader.start()
    time.sleep(0.5)  # let it reach Redis (if it has not, it meets the outage: the same path)
    server.kill()

    store.report("r1", B0, "w", 60, state="training", units_done=4)  # at once: held back for Redis
    restart = threading.Timer(2.0, server.start)
    restart.start()
    store.ack("r1", B0, [i for i, _ in first])  # these wait for Redis and then go through
    store.log_metrics("r1", B0, {"loss": 0.5, "unit": 3, "step": 40})
    rest = store.next_units("r1", B0, "w", count=1, block_ms=None)
    restart.join()
    reader.join(timeout=60)

    assert "error" not in blocked, blocked.get("error")
    assert blocked["units"] == [] and [u.seq for _, u in rest] == [4]
    progress = store.progress("r1", B0)
    assert progress["state"] == "training" and progress["units_done"] == "4"
    assert store.read_metrics("r1", B0)[1] == [{"loss": 0.5, "unit": 3, "step": 40}]
    assert store.queue_counts("r1", B0) == {"entries": 5, "pending": 1}  # the acks landed; unit 4 is out
    assert redis.Redis.from_url(server.url, decode_responses=True).get(keys.lease("r1", B0)) == "w"


def test_the_same_metrics_entry_twice_is_one_point(server):
    """What a retry after a lost reply sends again is not appended again."""
    store = RedisStore(server.url)
    m = {"loss": 1.0, "unit": 0, "step": 10, "t": 123.0}
    store.log_metrics("r1", B0, m)
    store.log_metrics("r1", B0, m)
    store.log_metrics("r1", B0, {**m, "t": 124.0})
    assert len(store.read_metrics("r1", B0)[1]) == 2


def test_an_outage_longer_than_the_budget_is_one_line_naming_redis(tmp_path):
    server = Server(tmp_path / "redis", password=SECRET).start()
    store = RedisStore(server.url, reconnect_seconds=1.5)
    store.report("r1", B0, state="training")
    server.kill()
    with pytest.raises(StoreError) as e:
        store.progress("r1", B0)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and SECRET not in message
    assert f"Redis at redis://:***@127.0.0.1:{server.port}/0 unreachable" in message
    assert "redis.reconnect_seconds=1.5" in message and "restart redis-server" in message
    with pytest.raises(StoreError, match="unreachable"):  # a report too, once the budget is spent
        store.report("r1", B0, state="training")


def test_the_embedded_redis_of_a_run_requires_its_stored_password(tmp_path):
    data = tmp_path / "redis"
    with EmbeddedRedis.for_run(data) as server:
        password = (data / "password").read_text().strip()
        assert len(password) >= 24 and server.password == password
        assert stat.S_IMODE((data / "password").stat().st_mode) == 0o600
        assert server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        assert RedisStore(server.url).progress("r1", B0) == {}
    assert stored_password(data) == password  # a resumed coordinator on the same output_dir reuses it


def test_orphan_cleanup_stops_only_the_redis_of_its_own_data_dir(tmp_path):
    other = EmbeddedRedis(tmp_path / "other").start()  # another run's redis-server
    try:
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "redis.pid").write_text(f"{other.proc.pid}\n")  # a stale pidfile naming another redis-server
        with EmbeddedRedis(mine):
            assert other.proc.poll() is None and other._client().ping()
        # a coordinator killed hard: its redis-server still runs on this data dir; the next one stops it
        left = EmbeddedRedis(mine).start()
        pid = left.proc.pid
        with EmbeddedRedis(mine):
            wait_for(lambda: left.proc.poll() is not None, 30, "the orphan to stop")
            assert left.proc.returncode == 0  # SIGTERM: a clean shutdown
        assert other.proc.poll() is None
        assert pid != other.proc.pid
    finally:
        other.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_sigterm_to_the_coordinator_stops_its_embedded_redis(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "coordinator", *TINY_DEBUG_JOB, "train.steps=400", f"output_dir={out}"]
    args += [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pidfile = out / "redis" / "redis.pid"
    pid = wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 180, "the embedded redis-server")
    assert _pid_alive(int(pid))
    wait_for(lambda: (out / "last_run").is_file() or proc.poll() is not None, 180, "the run")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    wait_for(lambda: not _pid_alive(int(pid)), 30, "the embedded redis-server to stop")


# Block workers on a local Ray (one torch thread each), 20 units of 10 steps per block: long enough
# to kill Redis while both blocks train.
RAY_JOB = [o for o in TINY_DEBUG_JOB if o.split("=")[0] not in ("workers.backend", "train.steps", "train.unit_steps")]
RAY_JOB += ["workers.backend=ray", "ray.num_cpus=2", "train.steps=200", "train.unit_steps=10"]
RAY_JOB = [o for o in RAY_JOB if not o.startswith(("train.checkpoint_every", "train.batch_size"))]
RAY_JOB += ["train.checkpoint_every=30", "train.batch_size=64", "train.threads=1"]


def test_redis_killed_and_restarted_mid_run_the_run_finishes_with_no_block_restarted(server, tmp_path):
    """SIGKILL the run's redis-server while both blocks train, restart it on the same port and AOF
    a few seconds later: the coordinator and both Ray workers ride it out (no restart, same worker
    processes), every unit is applied and acknowledged once, each unit's metrics point arrives once."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "coordinator", *RAY_JOB, f"redis.url={server.url}", f"output_dir={out}"]
    args += [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            look = redis.Redis.from_url(server.url, decode_responses=True)
            run = wait_for(lambda: next(iter(look.smembers(keys.runs)), None) or proc.poll(), 180, "the run")
            assert isinstance(run, str), (tmp_path / "stderr").read_text()[-3000:]
            jobs = [JobId("blocks", b) for b in range(2)]

            def training() -> dict | None:
                p = {j: look.hgetall(keys.progress(run, j)) for j in jobs}
                units = [int(q.get("units_done", 0)) for q in p.values()]
                return p if all(q.get("state") == "training" for q in p.values()) and min(units) >= 2 else None

            before = wait_for(lambda: training() or proc.poll(), 180, "both blocks training")
            assert isinstance(before, dict), (tmp_path / "stderr").read_text()[-3000:]
            server.kill()
            time.sleep(3)
            server.start()
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        said = err.read()
    assert proc.returncode == 0, said[-3000:]
    assert f"Redis at {server.url} is unreachable" in said and f"Redis at {server.url} is back" in said
    store = RedisStore(server.url)
    for job in jobs:
        p = store.progress(run, job)
        assert p["state"] == "done" and "restarts" not in p, p
        assert p["pid"] == before[job]["pid"]  # the same worker process throughout
        assert p["units_applied"] == "20"  # each unit applied once: nothing re-applied
        assert store.queue_counts(run, job) == {"entries": 20, "pending": 0}
        assert sorted(m["unit"] for m in store.read_metrics(run, job)[1]) == list(range(20))
    assert " failed (" not in said and "from its checkpoint" not in said  # the controller's restart line
