"""The coordinator loop as a small state machine: start the jobs, then step until every one is done.

Each :meth:`Controller.step`:
1. polls the worker group for finished workers: a result marks its job done, an error goes to
   the failure policy (restart from the checkpoint, or fail the block: the others go on, and once
   they are done the controller raises ``BlocksFailed`` naming the failed ones);
2. reads every job's progress from the store: an external job is done when its worker says so;
   a running worker whose heartbeat is older than its lease is stopped and treated as failed (time
   the store itself was unreachable does not count: no worker could report then);
3. queues each job's new metrics for its tracker run (``_forward_metrics``: once each, across
   restarts of the coordinator too);
4. shows the progress (``on_progress``) and says whether every job is done.

Nothing here knows Ray, Redis or MLflow: the parts are passed in (``coordinator/workers.py``,
``worker/store.py``, ``coordinator/tracking.py``, ``coordinator/policy.py``), so the tests step
it in-process with a MemoryStore, a NullTracker and dummy worker groups.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable

from worker.record import JobId, Manifest

from .policy import BlocksFailed, Decision, FailurePolicy, RunFailed, describe

if TYPE_CHECKING:  # the parts are passed in; the controller imports none of their implementations
    from worker.store import RunStore

    from .tracking import Tracker
    from .workers import WorkerGroup

log = logging.getLogger(__name__)


def worker_command(job: JobId, run_id: str, store_url: str) -> str:
    """What to run on another machine to train an external block."""
    return f"python -m worker block={job.index} run={run_id} redis.url={store_url}"


class Controller:
    def __init__(
        self,
        manifest: Manifest,
        store: RunStore,
        workers: WorkerGroup,
        tracker: Tracker,
        policy: FailurePolicy,
        jobs: Iterable[JobId],
        *,
        clock: Callable[[], float] = time.time,
        on_progress: Callable[[dict[JobId, dict]], None] | None = None,
    ):
        self.manifest, self.store, self.workers, self.tracker, self.policy = manifest, store, workers, tracker, policy
        self.jobs = list(jobs)
        self.clock, self.on_progress = clock, on_progress
        self.run_id = manifest.run_id
        self.external = {j for j in self.jobs if manifest.job(j).external}
        self.done: set[JobId] = set()
        self.beat: dict[JobId, str | None] = {}  # each job's heartbeat as last read
        self.alive: dict[JobId, float] = {}  # our clock when it last changed, or the job was (re)started
        self.reported: set[JobId] = set()  # jobs whose heartbeat changed since they were (re)started
        saved = store.cursors(self.run_id)  # what earlier coordinators of this run delivered
        self.cursors: dict[JobId, str] = {j: saved.get(str(j), "0") for j in self.jobs}  # last metrics entry queued
        self.steps: dict[JobId, int] = {j: int(saved.get(f"{j} step", -1)) for j in self.jobs}  # highest step queued
        self.waiting: dict[JobId, float] = {}  # when a job was first seen waiting for resources
        self.silent: set[JobId] = set()  # jobs whose staleness (external) or wait for resources was logged
        self.failed: dict[JobId, RunFailed] = {}  # jobs that failed for good, and why

    @property
    def finished(self) -> bool:
        return self.done >= set(self.jobs)

    @property
    def settled(self) -> bool:
        """Every job is done or failed for good."""
        return self.done | set(self.failed) >= set(self.jobs)

    def start(self) -> None:
        """Start every job that is neither done nor external; name the command for external ones."""
        progress = {j: self.store.progress(self.run_id, j) for j in self.jobs}
        now = self.clock()
        self.beat = {j: p.get("heartbeat") for j, p in progress.items()}  # earlier workers': no sign of life
        self.alive = dict.fromkeys(self.jobs, now)
        self.done = {j for j, p in progress.items() if p.get("state") == "done"}
        for job in self.jobs:
            if job in self.done:
                continue
            if job in self.external:
                log.info("%s is left to an external worker: %s", job, worker_command(job, self.run_id, self.store.url))
            else:
                self._start(job)

    def step(self, timeout: float = 1.0) -> bool:
        """One round: poll, apply the policy, forward metrics, show progress. True when all are done;
        raises ``BlocksFailed`` once every job is settled and some failed for good."""
        for job, _result, error in self.workers.poll(timeout):
            if error is None:
                self.done.add(job)
                self.failed.pop(job, None)  # given up on while it waited for resources, yet it finished
            elif job not in self.failed:
                self._failed(job, error)
                if job in self.failed:  # given up: free what its actor holds while the others finish
                    self.workers.stop(job)
        asked = time.monotonic()
        progress = {j: self.store.progress(self.run_id, j) for j in self.jobs}
        if time.monotonic() - asked > self.policy.lease_seconds / 3:  # the store was away (an outage ridden out)
            self._store_was_away()
        self.done |= {j for j in self.external if progress[j].get("state") == "done"}
        self._watch_heartbeats(progress)
        self._forward_metrics()
        if self.on_progress is not None:
            self.on_progress(progress)
        if self.failed and self.settled:
            raise BlocksFailed(self.failed, self.done)
        return self.finished

    def run(self, timeout: float = 1.0) -> None:
        """Every job to completion; a block that fails for good (its restarts exhausted, or a
        deterministic error) lets the others finish, then ``BlocksFailed`` (a RunFailed) names it."""
        self.start()
        while not self.step(timeout):
            pass

    # ---- transitions ---------------------------------------------------------------------
    def _start(self, job: JobId) -> None:
        """(Re)start ``job``; only a heartbeat written after this moment counts as the new worker's."""
        self.beat[job] = self.store.progress(self.run_id, job).get("heartbeat")
        self.workers.start(job)
        self.alive[job] = self.clock()
        self.waiting.pop(job, None)
        self.reported.discard(job)

    def _failed(self, job: JobId, error: BaseException) -> None:
        if self.policy.decide(job, error) is Decision.FAIL:
            self._give_up(job, self.policy.failure(job, error))
            return
        self.store.incr(self.run_id, job, "restarts")
        n, most = self.policy.restarts[job], self.policy.max_restarts
        log.warning("%s failed (%s); restart %d/%d from its checkpoint", job, describe(error), n, most)
        self._start(job)

    def _give_up(self, job: JobId, failure: RunFailed) -> None:
        """``job`` failed for good: recorded (its progress says so), the other jobs go on."""
        self.failed[job] = failure
        self.store.report(self.run_id, job, state="failed", error=failure.reason[:500])
        if not self.settled:
            log.error("%s; the other blocks go on", failure)

    def _store_was_away(self) -> None:
        """The store answered only after a wait longer than a heartbeat: no worker could report
        meanwhile, so that silence is not a hung worker's. Every job's silence counts from now."""
        now = self.clock()
        self.alive = {job: max(seen, now) for job, seen in self.alive.items()}

    def _watch_heartbeats(self, progress: dict[JobId, dict]) -> None:
        now = self.clock()
        for job, p in progress.items():
            if p.get("heartbeat") != self.beat.get(job):
                self.beat[job], self.alive[job] = p.get("heartbeat"), now
                self.reported.add(job)
        for job in sorted(self.workers.running() - self.done - set(self.failed)):
            short = None if job in self.reported else self.workers.unschedulable(job)
            if short is not None:  # waiting for resources, not hung: an autoscaler may add them
                since = self.waiting.setdefault(job, self.alive[job])
                self.alive[job] = now  # its start-up time counts from when it can be placed
                failure = self.policy.unscheduled(job, now - since, short)
                if failure is not None:
                    self._give_up(job, failure)
                    continue
                if job not in self.silent:
                    self.silent.add(job)
                    log.warning("%s is waiting for resources: %s", job, short)
                continue
            stale = self.policy.stale(progress[job], now - self.alive[job], job in self.reported)
            if stale is not None:
                self.workers.stop(job)
                self._failed(job, stale)
        for job in sorted(self.external - self.done):  # not ours to restart: say so once, keep waiting
            p = progress[job]
            stale = self.policy.stale(p, now - self.alive[job], reported=True) if job in self.reported else None
            if stale is None:
                self.silent.discard(job)
            elif job not in self.silent:
                self.silent.add(job)
                again = worker_command(job, self.run_id, self.store.url)
                who = p.get("consumer", "?")
                log.warning(
                    "%s: external worker %s is silent (%s); waiting (when its lease lapses, `%s` takes over)",
                    job,
                    who,
                    stale,
                    again,
                )

    def _forward_metrics(self) -> None:
        """Queue every job's new metrics entries for its tracker run, stamped with the time the
        worker measured them (``t``). The store's cursors (last entry, highest step) advance only
        once the tracker has delivered them, so a resumed coordinator starts where delivery stopped.
        An entry whose step was already queued -- a unit re-applied after a worker died before its
        checkpoint -- is skipped: the step keeps its first point (a re-application computes the
        same step from the same checkpoint and unit)."""
        moved = {}
        for job in self.jobs:
            cursor, entries = self.store.read_metrics(self.run_id, job, self.cursors[job])
            run = self.manifest.job(job).mlflow_run
            for m in entries:
                if m["step"] <= self.steps[job]:
                    continue
                self.steps[job] = m["step"]
                values = {k: v for k, v in m.items() if k not in ("step", "t")}
                self.tracker.log_metrics(run, values, m["step"], timestamp=m.get("t"))
            if cursor != self.cursors[job]:
                self.cursors[job] = cursor
                moved |= {str(job): cursor, f"{job} step": str(self.steps[job])}
        if moved:
            self.tracker.when_delivered(lambda: self.store.set_cursors(self.run_id, moved))
