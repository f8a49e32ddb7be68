"""The coordinator loop in-process, in seconds: the Controller stepped with an in-memory store, a
no-op tracker and dummy worker groups (no Ray, no redis-server, no MLflow). The thing under test is
the controller and its failure policy; one test also runs real BlockWorkers through InlineWorkers."""

from __future__ import annotations

import logging
import time

import pytest

from coordinator.controller import Controller
from coordinator.policy import Decision, FailurePolicy, RunFailed, StaleHeartbeat, describe
from coordinator.tracking import NullTracker
from dblocks.datacard import DataError
from dblocks.plan import BlockSpec
from worker.record import Job, JobId, Manifest
from worker.store import MemoryStore

RUN = "run-1"
LEASE = 30.0
B0, B1 = JobId("blocks", 0), JobId("blocks", 1)


class Clock:
    """Real time plus a manual offset: ``advance`` makes every heartbeat older without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class ScriptedWorkers:
    """A dummy worker group. Attempt k of a job does ``script[job][k]``: ``ok`` (when polled: logs
    ``metrics`` entries, reports done, returns a result), ``raise`` (a ValueError), ``bad-row`` (a
    DataError, as the dataset reader raises for a row it refuses), ``hang`` (reports
    once when started, then never again), ``silent`` (never reports, like an actor that never comes
    up) or ``unplaced`` (never reports: its actor asks for more than the cluster has, ``short``).
    Unscripted jobs are ``ok`` on every attempt."""

    short = "workers.num_cpus=8: the cluster has 4 CPU; lower workers.num_cpus"

    def __init__(self, store: MemoryStore, script: dict[JobId, list[str]] | None = None, metrics: int = 1):
        self.store, self.script, self.metrics = store, script or {}, metrics
        self.started: list[JobId] = []
        self.stopped: list[JobId] = []
        self.active: dict[JobId, str] = {}

    def attach(self, store, run_id) -> None:
        pass

    def start(self, job: JobId) -> None:
        attempt = self.started.count(job)
        self.started.append(job)
        self.active[job] = self.script.get(job, ["ok"] * (attempt + 1))[attempt]
        if self.active[job] == "hang":
            self.store.report(RUN, job, state="starting")

    def stop(self, job: JobId) -> None:
        self.stopped.append(job)
        self.active.pop(job, None)

    def running(self) -> set[JobId]:
        return set(self.active)

    def unschedulable(self, job: JobId) -> str | None:
        return self.short if self.active.get(job) == "unplaced" else None

    def poll(self, timeout: float) -> list:
        out = []
        for job, what in sorted(self.active.items()):
            if what in ("hang", "silent", "unplaced"):
                continue
            del self.active[job]
            if what in ("raise", "bad-row"):
                self.store.report(RUN, job, state="failed")
                kind = ValueError if what == "raise" else DataError
                out.append((job, None, kind(f"boom in {job}")))
                continue
            for step in range(self.metrics):
                self.store.log_metrics(RUN, job, {"step": 10 * (step + 1), "loss": 1.0 / (step + 1)})
            self.store.report(RUN, job, state="done")
            out.append((job, {"job": str(job)}, None))
        return out


def spec(index: int, num_blocks: int) -> BlockSpec:
    lo, hi = float(num_blocks - index - 1), float(num_blocks - index)
    return BlockSpec(index, num_blocks, lo, hi, lo, hi, layer_start=index, layer_end=index + 1)


def make_run(store: MemoryStore, num_blocks: int = 2, external: tuple[int, ...] = ()) -> Manifest:
    jobs = {}
    for b in range(num_blocks):
        job = JobId("blocks", b)
        jobs[job] = Job(job, spec(b, num_blocks), "plan", 1, f"t-block{b}", f"mlrun-{b}", b in external)
    manifest = Manifest(RUN, "t", time.time(), {}, "/nowhere", [], jobs, NullTracker.uri, "parent")
    store.create_run(manifest, {j: [] for j in jobs})
    return manifest


def controller(store, workers, *, max_restarts=2, external=(), clock=None, tracker=None) -> Controller:
    manifest = make_run(store, external=external)
    policy = FailurePolicy(max_restarts=max_restarts, lease_seconds=LEASE)
    kwargs = {"clock": clock} if clock else {}
    return Controller(manifest, store, workers, tracker or NullTracker(), policy, list(manifest.jobs), **kwargs)


def steps_until_done(c: Controller, limit: int = 20) -> int:
    for n in range(1, limit + 1):
        if c.step(timeout=0):
            return n
    raise AssertionError(f"not done after {limit} steps")


def test_a_worker_that_raises_is_restarted_and_then_succeeds():
    store = MemoryStore()
    workers = ScriptedWorkers(store, {B1: ["raise", "ok"]})
    c = controller(store, workers)
    c.run(timeout=0)
    assert workers.started == [B0, B1, B1] and workers.stopped == []
    assert store.progress(RUN, B1)["restarts"] == "1" and "restarts" not in store.progress(RUN, B0)
    assert store.progress(RUN, B1)["state"] == "done" and c.policy.restarts[B1] == 1


def test_a_hung_worker_is_detected_by_its_stale_heartbeat_stopped_and_restarted():
    store, clock = MemoryStore(), Clock()
    workers = ScriptedWorkers(store, {B1: ["hang", "ok"]})
    c = controller(store, workers, clock=clock)
    c.start()
    assert not c.step(timeout=0)  # block 0 done; block 1 reported once
    clock.advance(LEASE - 1)
    assert not c.step(timeout=0) and workers.started.count(B1) == 1  # quiet, but within its lease
    clock.advance(2)
    assert not c.step(timeout=0)  # stale: stopped and restarted from its checkpoint
    assert workers.stopped == [B1] and workers.started.count(B1) == 2
    assert store.progress(RUN, B1)["restarts"] == "1"
    assert steps_until_done(c) == 1


def test_a_worker_that_never_reports_gets_the_start_up_time_then_counts_as_hung():
    store, clock = MemoryStore(), Clock()
    workers = ScriptedWorkers(store, {B1: ["silent", "ok"]})
    c = controller(store, workers, clock=clock)
    c.start()
    clock.advance(LEASE + 1)  # no first heartbeat yet: a Ray actor may take long to come up
    assert not c.step(timeout=0) and workers.stopped == []
    clock.advance(c.policy.startup_seconds - LEASE)
    assert not c.step(timeout=0) and workers.stopped == [B1] and workers.started.count(B1) == 2
    assert steps_until_done(c) == 1


def test_a_block_waiting_for_resources_is_not_restarted_and_fails_after_the_schedule_timeout(caplog):
    store, clock = MemoryStore(), Clock()
    workers = ScriptedWorkers(store, {B1: ["unplaced"]})
    c = controller(store, workers, clock=clock)
    c.policy.schedule_timeout = 300
    c.start()
    clock.advance(c.policy.startup_seconds + 1)  # past the start-up time: waiting, not hung
    assert not c.step(timeout=0) and workers.stopped == []
    assert sum("blocks/1 is waiting for resources: workers.num_cpus=8" in r.message for r in caplog.records) == 1
    clock.advance(300 - c.policy.startup_seconds)  # 301 s since its start
    with pytest.raises(RunFailed) as e:
        c.step(timeout=0)
    assert str(e.value) == (
        "blocks/1 was not scheduled in 301 s (workers.schedule_timeout=300): " + ScriptedWorkers.short
    )
    assert workers.started.count(B1) == 1 and workers.stopped == []  # no restart spent


def test_a_block_placed_after_waiting_gets_its_start_up_time_from_then():
    store, clock = MemoryStore(), Clock()
    workers = ScriptedWorkers(store, {B1: ["unplaced", "ok"]})
    c = controller(store, workers, clock=clock)
    c.start()
    clock.advance(500)
    assert not c.step(timeout=0)
    workers.active[B1] = "silent"  # the cluster grew: placed, its process is starting
    clock.advance(c.policy.startup_seconds - 1)
    assert not c.step(timeout=0) and workers.stopped == []
    clock.advance(2)
    assert not c.step(timeout=0) and workers.stopped == [B1]  # now it counts as hung: restarted
    assert steps_until_done(c) == 1


class StallingStore(MemoryStore):
    """A run store that, while ``stall`` is set, answers a progress read only after a wait (a Redis
    outage ridden out), during which the controller's clock moves ``stall`` seconds."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock, self.stall = clock, 0.0

    def progress(self, run, job):
        if self.stall:
            time.sleep(0.2)  # longer than a heartbeat (lease_seconds / 3 = 0.1 s below)
            self.clock.advance(self.stall)
            self.stall = 0.0
        return super().progress(run, job)


def test_time_the_store_was_unreachable_does_not_count_as_a_workers_silence():
    clock = Clock()
    store = StallingStore(clock)
    workers = ScriptedWorkers(store, {B1: ["hang", "ok"]})
    manifest = make_run(store)
    policy = FailurePolicy(max_restarts=2, lease_seconds=0.3, startup_seconds=0.3)
    c = Controller(manifest, store, workers, NullTracker(), policy, list(manifest.jobs), clock=clock)
    c.start()
    assert not c.step(timeout=0)  # block 1 reported once ("hang"): now it is silent
    store.stall = 100.0  # Redis away for 100 s of the controller's time: nobody could report
    assert not c.step(timeout=0) and workers.stopped == []
    clock.advance(0.31)  # silent for longer than its lease with the store there: hung
    assert not c.step(timeout=0) and workers.stopped == [B1]


def test_staleness_is_the_silence_since_the_last_heartbeat_or_start():
    policy = FailurePolicy(max_restarts=2, lease_seconds=LEASE, startup_seconds=120)
    training = {"state": "training"}
    assert policy.stale(training, quiet=29, reported=True) is None
    stale = policy.stale(training, quiet=31, reported=True)
    assert isinstance(stale, StaleHeartbeat) and str(stale) == "no heartbeat for 31 s (workers.lease_seconds=30)"
    assert policy.stale({}, quiet=119, reported=False) is None  # still starting up
    assert isinstance(policy.stale({}, quiet=121, reported=False), StaleHeartbeat)
    assert policy.stale({"state": "done"}, quiet=1e6, reported=True) is None
    assert [policy.decide(B0, stale) for _ in range(3)] == [Decision.RESTART, Decision.RESTART, Decision.FAIL]


def test_exhausted_restarts_fail_the_run_in_one_line_naming_the_block():
    store = MemoryStore()
    c = controller(store, ScriptedWorkers(store, {B1: ["raise"] * 3}), max_restarts=2)
    with pytest.raises(RunFailed) as e:
        c.run(timeout=0)
    assert str(e.value) == "blocks/1 failed 3 times, last: ValueError: boom in blocks/1"
    store, clock = MemoryStore(), Clock()
    c = controller(store, ScriptedWorkers(store, {B1: ["hang"]}), max_restarts=0, clock=clock)
    c.start()
    c.step(timeout=0)
    clock.advance(LEASE + 1)
    with pytest.raises(RunFailed) as e:
        c.step(timeout=0)
    stale = "StaleHeartbeat: no heartbeat for 31 s (workers.lease_seconds=30)"
    assert str(e.value) == f"blocks/1 failed 1 times, last: {stale}"
    assert c.workers.stopped == [B1]


def test_bad_data_fails_the_run_at_once_without_spending_restarts():
    store = MemoryStore()
    workers = ScriptedWorkers(store, {B1: ["bad-row", "ok"]})
    c = controller(store, workers, max_restarts=2)
    with pytest.raises(RunFailed) as e:
        c.run(timeout=0)
    assert str(e.value) == "blocks/1 failed, not restarted (it would fail the same way): DataError: boom in blocks/1"
    assert workers.started.count(B1) == 1


def test_describe_is_one_line_with_the_error_type():
    assert describe(ValueError("bad\n  more\n")) == "ValueError: more"
    ray_style = RuntimeError("Traceback (most recent call last):\n  File x\nKeyError: 'blocks/3'")
    assert describe(ray_style) == "KeyError: 'blocks/3'"
    assert describe(MemoryError()) == "MemoryError"


def test_an_external_block_is_left_alone_and_done_when_its_worker_says_so(caplog):
    store, clock = MemoryStore(), Clock()
    workers = ScriptedWorkers(store)
    c = controller(store, workers, external=(1,), clock=clock)
    with caplog.at_level(logging.INFO, logger="coordinator.controller"):
        c.start()
    assert f"python -m worker block=1 run={RUN} redis.url={store.url}" in caplog.text
    assert not c.step(timeout=0) and workers.started == [B0]
    store.report(RUN, B1, state="training")  # the external worker joins
    assert not c.step(timeout=0)
    clock.advance(LEASE + 1)  # and goes silent: not ours to restart; said once, then waited for
    with caplog.at_level(logging.WARNING, logger="coordinator.controller"):
        assert not c.step(timeout=0) and not c.step(timeout=0)
    assert caplog.text.count("is silent") == 1 and workers.started == [B0] and workers.stopped == []
    store.report(RUN, B1, state="done")  # another external worker finished it
    assert c.step(timeout=0)
    assert "restarts" not in store.progress(RUN, B1)


def test_metrics_are_forwarded_to_each_jobs_tracker_run_once():
    store, tracker = MemoryStore(), NullTracker()
    c = controller(store, ScriptedWorkers(store, {B1: ["raise", "ok"]}, metrics=3), tracker=tracker)
    c.run(timeout=0)
    for _ in range(3):  # nothing new: nothing forwarded again
        assert c.step(timeout=0)
    expected = [({"loss": 1.0}, 10), ({"loss": 0.5}, 20), ({"loss": 1 / 3}, 30)]
    assert tracker.metrics["mlrun-0"] == expected and tracker.metrics["mlrun-1"] == expected


def test_real_block_workers_train_inline_end_to_end_through_the_controller(tmp_path):
    """Two debug-DiT blocks, 2 units of 10 steps each, trained by real BlockWorkers in this process."""
    from coordinator.run import new_run, open_data, register
    from coordinator.workers import InlineWorkers
    from dblocks.checkpoint import load_checkpoint
    from worker.block_worker import checkpoint_rel, export_rel
    from worker.config import load_run_config
    from worker.storage import Storage

    train = {"steps": 20, "unit_steps": 10, "checkpoint_every": 10, "batch_size": 16, "threads": 1}
    cfg = load_run_config(
        {
            "name": "t",
            "output_dir": str(tmp_path),
            "baseline": False,
            "blocks": {"num": 2},
            "model": {"family": "dit", "size": "debug"},
            "redis": {"url": "memory://t"},
            "workers": {"backend": "inline"},
            "train": {**train, "warmup_samples": 64, "ema_halflife_samples": 64},
        }
    )
    store, tracker, storage = MemoryStore(), NullTracker(), Storage(str(tmp_path / "storage"))
    cfg, data = open_data(cfg, storage)
    manifest = new_run(cfg, store, tracker, storage, data)
    workers = InlineWorkers(cfg)
    workers.attach(store, manifest.run_id)
    policy = FailurePolicy(cfg.workers.max_restarts, cfg.workers.lease_seconds)
    jobs = list(manifest.jobs)
    Controller(manifest, store, workers, tracker, policy, jobs).run(timeout=0)
    register(manifest, store, tracker, storage, jobs, data)
    for job in jobs:
        p = store.progress(manifest.run_id, job)
        assert p["state"] == "done" and p["consumer"] == f"inline-{job}" and p["units_done"] == "2"
        _, meta = load_checkpoint(storage.get_file(checkpoint_rel(manifest.run_id, job), tmp_path / "ckpt"))
        assert meta["units"] == [0, 1] and meta["samples"] == 20 * 16
        assert storage.exists(export_rel(manifest.run_id, job))
        logged = tracker.metrics[manifest.job(job).mlflow_run]
        assert [step for _, step in logged] == [10, 20] and all(0 < m["loss"] < 1e3 for m, _ in logged)
        assert tracker.versions[f"t-block{job.index}"][0]["lo"] == repr(manifest.job(job).spec.lo)
    assert set(manifest.registered) == set(jobs) and store.manifest(manifest.run_id).registered == manifest.registered


@pytest.mark.parametrize(
    "workers, have, says",
    [
        (
            {"num_cpus": 2},
            {"CPU": 1},
            "workers.num_cpus=2: this machine's Ray has 1 CPU; lower workers.num_cpus or raise",
        ),
        ({"num_gpus": 1}, {"CPU": 4}, "workers.num_gpus=1: this machine's Ray has 0 GPU; lower workers.num_gpus"),
        ({"resources": {"A100": 1}}, {"CPU": 4, "A100": 0.5}, "workers.resources.A100=1: this machine's Ray has 0.5"),
        ({"num_cpus": 1, "num_gpus": 0.5}, {"CPU": 1, "GPU": 1}, None),
    ],
)
def test_a_block_a_fixed_cluster_cannot_host_is_named_before_it_queues(workers, have, says):
    from coordinator.workers import unschedulable
    from dblocks.config import WorkersConfig

    short = unschedulable(WorkersConfig(**workers), have)
    assert short == says if says is None else short.startswith(says)
