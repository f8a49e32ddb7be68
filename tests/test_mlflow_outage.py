"""MLflow off the critical path (coordinator/forwarding.py) and the metrics cursor in the run store.

Unit tests drive the QueuedTracker over the in-memory NullTracker behind ``Flaky``, a double of MLflow
that is unreachable (ConnectionError) or refuses a request while the test says so. The acceptance
tests run the real coordinator against a real ``mlflow server`` that they stop and start again on
the same port and store: a 60 s outage mid-training, a SIGKILLed coordinator resumed by id, and an
outage longer than ``mlflow.wait_seconds`` at registration.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from services import ROOT, error_lines, run_cli

from coordinator.controller import Controller
from coordinator.forwarding import QueuedTracker
from coordinator.policy import FailurePolicy
from coordinator.tracking import MlflowTracker, NullTracker, TrackingError
from dblocks.plan import BlockSpec
from helpers import TINY_DEBUG_JOB, wait_for
from worker.record import Job, JobId, Manifest
from worker.store import RedisStore

FAST = (0.01, 0.05)  # the queue's backoff in unit tests (seconds)
B0, B1 = JobId("blocks", 0), JobId("blocks", 1)


class Flaky(NullTracker):
    """A NullTracker that MLflow can take down (every call: ConnectionError), make refuse (one call:
    a 400), or make hang (every call waits for ``gate``); ``attempts`` counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refuse: set[int] = set()  # steps whose log_metrics is refused
        self.gate = threading.Event()
        self.gate.set()
        self.attempts = 0

    def _check(self) -> None:
        self.attempts += 1
        self.gate.wait()
        if self.down:
            raise ConnectionError("Connection refused")

    def log_metrics(self, run_id, metrics, step, timestamp=None):
        self._check()
        if step in self.refuse:
            raise MlflowException.invalid_parameter_value("bad metric")
        super().log_metrics(run_id, metrics, step, timestamp)

    def end(self, run_id, ok, killed=False):
        self._check()
        super().end(run_id, ok, killed)

    def register_block(self, run_id, export_file, name, tags, alias, description=""):
        self._check()
        return super().register_block(run_id, export_file, name, tags, alias, description)


def points(tracker: NullTracker, run: str = "r") -> list[int]:
    return [step for _, step in tracker.metrics[run]]


@pytest.fixture
def flaky():
    inner = Flaky()
    queued = QueuedTracker(inner, wait_seconds=600, backoff=FAST)
    yield inner, queued
    inner.down, inner.refuse = False, set()
    inner.gate.set()
    queued.close(timeout=10)


# ---- the queue ------------------------------------------------------------------------------
def test_logging_returns_while_mlflow_hangs_and_order_is_kept(flaky):
    inner, queued = flaky
    inner.gate.clear()  # every MLflow call hangs
    for step in range(50):
        queued.log_metrics("r", {"loss": 1.0 / (step + 1)}, step)
    assert points(inner) == [] and queued.pending() == 50  # all 50 returned; none delivered
    inner.gate.set()
    assert queued.flush(timeout=30)
    assert points(inner) == list(range(50)) and inner.metrics["r"][3][0] == {"loss": 0.25}


def test_an_outage_is_retried_and_each_call_delivered_once_in_order(flaky, caplog):
    inner, queued = flaky
    inner.down = True
    with caplog.at_level(logging.WARNING, logger="coordinator.forwarding"):
        for step in range(20):
            queued.log_metrics("r", {"loss": float(step)}, step)
        wait_for(lambda: inner.attempts >= 10, 60, "retries")
        assert points(inner) == [] and not queued.flush(timeout=0)
        inner.down = False
        assert queued.flush(timeout=30)
    assert points(inner) == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable (Connection refused); training goes on" in m for m in lines) == 1
    assert sum("is back after" in m for m in lines) == 1 and len(lines) == 2


def test_a_refused_call_is_dropped_in_one_line_and_the_rest_delivered(flaky, caplog):
    inner, queued = flaky
    inner.refuse = {1}
    with caplog.at_level(logging.WARNING, logger="coordinator.forwarding"):
        for step in range(3):
            queued.log_metrics("r", {"loss": 1.0}, step)
        assert queued.flush(timeout=30)
    assert points(inner) == [0, 2] and queued.dropped == 1
    assert "MLflow refused to log metrics of run r (bad metric); dropped" in caplog.text


def test_registration_and_end_wait_for_mlflow_and_flush_first(flaky, caplog):
    inner, queued = flaky
    run = queued.start_run("parent", {})
    inner.down = True
    queued.log_metrics(run, {"loss": 1.0}, 1)
    result = {}
    waiter = threading.Thread(
        target=lambda: result.update(v=queued.register_block(run, Path("x"), "m-block0", {}, "a"))
    )
    with caplog.at_level(logging.WARNING, logger="coordinator.forwarding"):
        waiter.start()
        wait_for(lambda: "register m-block0: waiting for MLflow" in caplog.text, 60, "the waiting line")
        wait_for(lambda: inner.attempts >= 10, 60, "retries")
        assert waiter.is_alive() and inner.versions == {}
        inner.down = False
        waiter.join(timeout=30)
    assert result == {"v": "1"} and points(inner, run) == [1]  # the point queued before went first
    queued.end(run, ok=True)
    assert inner.runs[run]["status"] == "FINISHED"


def test_a_waiting_call_gives_up_after_wait_seconds_in_one_line_and_later_ones_at_once(caplog):
    inner = Flaky()
    queued = QueuedTracker(inner, wait_seconds=0.5, backoff=FAST)
    run = queued.start_run("parent", {})
    inner.down = True
    with pytest.raises(TrackingError) as e:
        queued.register_block(run, Path("x"), "m-block0", {}, "a")
    msg = str(e.value)
    assert "\n" not in msg and "unreachable for" in msg and "mlflow.wait_seconds=0.5" in msg
    assert "could not register m-block0" in msg and "resume=<run id>" in msg
    tries = inner.attempts
    with pytest.raises(TrackingError, match="could not end run"):
        queued.end(run, ok=False)  # no second wait: given up until MLflow answers again
    assert inner.attempts == tries + 1
    inner.down = False
    queued.end(run, ok=True)  # MLflow is back: calls work again
    assert inner.runs[run]["status"] == "FINISHED" and inner.versions == {}
    queued.close()


# ---- the metrics cursor in the run store ------------------------------------------------------
class Idle:
    """A worker group with nothing running: the controller only reads progress and forwards metrics."""

    def attach(self, store, run_id): ...
    def start(self, job): ...
    def stop(self, job): ...
    def running(self):
        return set()

    def unschedulable(self, job):
        return None

    def poll(self, timeout):
        return []


def make_run(store, run: str = "run-1") -> Manifest:
    jobs = {}
    for b in range(2):
        spec = BlockSpec(b, 2, float(1 - b), float(2 - b), float(1 - b), float(2 - b), layer_start=b, layer_end=b + 1)
        jobs[JobId("blocks", b)] = Job(JobId("blocks", b), spec, "plan", 1, f"t-block{b}", f"mlrun-{b}")
    manifest = Manifest(run, "t", time.time(), {}, "/nowhere", [], jobs, NullTracker.uri, "parent")
    store.create_run(manifest, {j: [] for j in jobs})
    return manifest


def forward(store, manifest, tracker) -> Controller:
    """A fresh controller (a coordinator started again on the run) stepped once."""
    c = Controller(manifest, store, Idle(), tracker, FailurePolicy(2, 30.0), list(manifest.jobs))
    c.step(timeout=0)
    return c


def log(store, run: str, job: JobId, *steps: int) -> None:
    for s in steps:
        store.log_metrics(run, job, {"step": s, "loss": 1.0 / s, "t": 1000.0 + s})


def test_a_new_coordinator_forwards_only_what_was_not_delivered(store):
    manifest = make_run(store)
    run = manifest.run_id
    log(store, run, B0, 10, 20, 30)
    log(store, run, B1, 10)
    first = Flaky()
    queued = QueuedTracker(first, backoff=FAST)
    forward(store, manifest, queued)
    assert queued.flush(timeout=30) and points(first, "mlrun-0") == [10, 20, 30] and points(first, "mlrun-1") == [10]
    assert store.cursors(run)["blocks/0 step"] == "30"
    queued.close()

    log(store, run, B0, 40)
    log(store, run, B1, 10, 20)  # block 1's unit re-applied after its worker died before a checkpoint
    second = Flaky()
    queued = QueuedTracker(second, backoff=FAST)
    c = forward(store, manifest, queued)
    c.step(timeout=0)  # nothing new: nothing again
    assert queued.flush(timeout=30) and points(second, "mlrun-0") == [40] and points(second, "mlrun-1") == [20]
    assert second.metrics["mlrun-1"][0][0] == {"loss": 0.05}  # "step" and the time "t" are not metrics
    cursors = store.cursors(run)
    assert cursors["blocks/0 step"] == "40" and cursors["blocks/1 step"] == "20"
    queued.close()


def test_the_cursor_advances_only_once_mlflow_has_the_points(store):
    manifest = make_run(store)
    run = manifest.run_id
    log(store, run, B0, 10, 20)
    down = Flaky()
    down.down = True
    dead = QueuedTracker(down, backoff=FAST)
    forward(store, manifest, dead)
    wait_for(lambda: down.attempts >= 3, 60, "retries")
    assert store.cursors(run) == {}  # queued, not delivered: a coordinator dying now loses nothing
    dead.close(timeout=0)  # that coordinator dies with its queue

    up = Flaky()
    queued = QueuedTracker(up, backoff=FAST)
    forward(store, manifest, queued)
    assert queued.flush(timeout=30) and points(up, "mlrun-0") == [10, 20] and points(down, "mlrun-0") == []
    assert store.cursors(run)["blocks/0 step"] == "20"
    queued.close()


def test_resending_a_point_after_a_lost_answer_adds_nothing_to_mlflow(tmp_path):
    """A point keeps its worker's timestamp, so delivering it twice (MLflow stored it, the answer
    was lost, the queue retried) leaves one point in a SQL store's history."""
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = MlflowTracker(uri, "resend", (tmp_path / "art").as_uri())
    run = tracker.start_run("r", {})
    for _ in range(2):
        tracker.log_metrics(run, {"loss": 0.5}, 10, timestamp=1234.5)
    tracker.log_metrics(run, {"loss": 0.25}, 20, timestamp=1240.0)
    history = MlflowClient(uri).get_metric_history(run, "loss")
    assert [(m.step, m.timestamp) for m in history] == [(10, 1234500), (20, 1240000)]
    tracker.end(run, ok=True)


# ---- acceptance: the coordinator against a real MLflow server ---------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a sqlite store with served artifacts, in its own process group, which
    ``stop`` SIGKILLs and ``start`` starts again on the same port and store."""

    def __init__(self, base: Path):
        self.base, self.port = base, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 150) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri"]
        cmd += [f"sqlite:///{self.base}/m.db", "--artifacts-destination", str(self.base / "art")]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.base / "server.log", "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, timeout, "the MLflow server")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, (self.base / "server.log").read_text()[-2000:]
        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def job(steps: int, unit_steps: int, checkpoint_every: int) -> list[str]:
    """TINY_DEBUG_JOB with this much training (batch 16, one torch thread)."""
    base = [a for a in TINY_DEBUG_JOB if not a.startswith("train.")]
    train = {"steps": steps, "unit_steps": unit_steps, "checkpoint_every": checkpoint_every}
    return [*base, *(f"train.{k}={v}" for k, v in train.items()), "train.batch_size=16", "train.threads=1"]


def services(name: str, server: MlflowServer, redis_url: str, out: Path) -> list[str]:
    return [f"name={name}", f"redis.url={redis_url}", f"mlflow.tracking_uri={server.uri}", f"output_dir={out}"]


def start(args: list[str], out: Path) -> subprocess.Popen:
    """The coordinator in the background, its output in files (a pipe could fill and stall it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.out", "w") as o, open(out.parent / f"{out.name}.err", "w") as e:
        return subprocess.Popen([sys.executable, "-m", "coordinator", *args], cwd=ROOT, stdout=o, stderr=e)


def stderr_of(out: Path) -> str:
    return (out.parent / f"{out.name}.err").read_text()


def the_run(store: RedisStore) -> str:
    return wait_for(lambda: next(iter(store.r.smembers("dblocks:runs")), None), 120, "the run")


def units_done(store: RedisStore, run: str, job: JobId) -> int:
    return int(store.progress(run, job).get("units_done", 0))


def check_tracked(server: MlflowServer, name: str, run: str, steps: list[int]) -> str:
    """The run's parent run finished; each block's child run has one ``loss`` point per step and its
    block is registered once, alias candidate. Returns the parent run's id."""
    c = server.client()
    exp = c.get_experiment_by_name(name).experiment_id
    (parent,) = c.search_runs([exp], f"tags.`dblocks.run_id` = '{run}'")
    assert parent.info.status == "FINISHED"
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["blocks/0", "blocks/1"]
    for child in children:
        assert [m.step for m in c.get_metric_history(child.info.run_id, "loss")] == steps, child.info.run_name
        assert child.info.status == "FINISHED"
    for b in range(2):
        (version,) = c.search_model_versions(f"name = '{name}-block{b}'")
        assert c.get_model_version_by_alias(f"{name}-block{b}", "candidate").version == version.version
        assert version.tags["run_id"] == run
    return parent.info.run_id


def test_training_goes_on_through_a_60_s_mlflow_outage_and_every_point_arrives_once(mlflow_server, redis_url, tmp_path):
    """Stop MLflow (SIGKILL) while block 0 trains, for at least 60 s and until block 1 -- whose first
    inline turn follows block 0's, up to block 0's first checkpoint -- is training too; then start it again."""
    out, store = tmp_path / "outage", RedisStore(redis_url)
    proc = start([*job(1500, 50, 500), *services("outage", mlflow_server, redis_url, out)], out)
    run = the_run(store)
    wait_for(lambda: units_done(store, run, B0) >= 2, 120, "block 0 training")
    mlflow_server.stop()
    stopped, before = time.time(), units_done(store, run, B0)
    wait_for(lambda: time.time() - stopped >= 60 and units_done(store, run, B1) >= 1, 150, "block 1 training")
    assert proc.poll() is None  # still running (or waiting for MLflow to register), not failed
    assert units_done(store, run, B0) > before
    restarted = time.time()
    mlflow_server.start()
    assert proc.wait(timeout=240) == 0, stderr_of(out)[-3000:]
    err = stderr_of(out)
    assert "is unreachable" in err and "training goes on" in err and "is back after" in err
    parent = check_tracked(mlflow_server, "outage", run, list(range(50, 1501, 50)))
    # System metrics sampled during the outage were kept and delivered afterwards.
    cpu = mlflow_server.client().get_metric_history(parent, "system/cpu_utilization_percentage")
    assert any(1000 * stopped < m.timestamp < 1000 * restarted for m in cpu)
    assert len({m.step for m in cpu}) == len(cpu)


def test_a_killed_coordinator_resumed_by_id_sends_each_point_once(mlflow_server, redis_url, tmp_path):
    """Block 0 finishes and its points reach MLflow; SIGKILL while block 1 trains, before its only
    checkpoint (so its units are applied again after the resume); ``resume=<run id>``. One checkpoint
    a block, at its end: an inline turn lasts to a checkpoint, so block 0 trains whole, then block 1."""
    out, store = tmp_path / "resume", RedisStore(redis_url)
    args = [*job(400, 20, 400), *services("resumed", mlflow_server, redis_url, out)]
    proc = start(args, out)
    run = the_run(store)
    wait_for(lambda: store.cursors(run).get("blocks/0 step") == "400", 150, "block 0's points delivered")
    wait_for(lambda: units_done(store, run, B1) >= 3, 120, "block 1 mid-run")
    proc.kill()
    proc.wait()
    done = run_cli("coordinator", *args, f"resume={run}", timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [m["step"] for m in store.read_metrics(run, B1)[1]]
    assert len(steps) > len(set(steps))  # block 1 logged some steps twice: units re-applied
    check_tracked(mlflow_server, "resumed", run, list(range(20, 401, 20)))


def test_mlflow_down_past_wait_seconds_at_registration_stops_in_one_line_and_resume_finishes(
    mlflow_server, redis_url, tmp_path
):
    out, store = tmp_path / "late", RedisStore(redis_url)
    args = [*job(400, 50, 400), *services("late", mlflow_server, redis_url, out)]
    proc = start([*args, "mlflow.wait_seconds=15"], out)
    run = the_run(store)
    wait_for(lambda: units_done(store, run, B0) >= 1, 120, "block 0 training")
    mlflow_server.stop()
    try:
        rc = proc.wait(timeout=170)
    finally:
        mlflow_server.start()
    assert rc not in (0, None)
    errors = error_lines(subprocess.CompletedProcess([], rc, "", stderr_of(out)))
    assert len(errors) == 1 and "has been unreachable for" in errors[0] and "mlflow.wait_seconds=15" in errors[0]
    assert all(store.progress(run, j)["state"] == "done" for j in (B0, B1))  # the blocks are trained
    done = run_cli("coordinator", *args, f"resume={run}", timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    check_tracked(mlflow_server, "late", run, list(range(50, 401, 50)))
