"""The coordinator loop as a small state machine: start the jobs, then step until every one is done.

Each :meth:`Controller.step`:
1. polls the worker group for finished workers: a result marks its job done, an error goes to
   the failure policy (restart from the checkpoint, or fail the run);
2. reads every job's progress from the store: an external job is done when its worker says so;
   a running worker whose heartbeat is older than its lease is stopped and treated as failed;
3. forwards each job's new metrics to its tracker run (once each: a cursor per job);
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

from .policy import Decision, FailurePolicy, describe

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
        self.cursors: dict[JobId, str] = {j: "0" for j in self.jobs}  # last metrics entry forwarded
        self.waiting: dict[JobId, float] = {}  # when a job was first seen waiting for resources
        self.silent: set[JobId] = set()  # jobs whose staleness (external) or wait for resources was logged

    @property
    def finished(self) -> bool:
        return self.done >= set(self.jobs)

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
        """One round: poll, apply the policy, forward metrics, show progress. True when all are done."""
        for job, _result, error in self.workers.poll(timeout):
            if error is None:
                self.done.add(job)
            else:
                self._failed(job, error)
        progress = {j: self.store.progress(self.run_id, j) for j in self.jobs}
        self.done |= {j for j in self.external if progress[j].get("state") == "done"}
        self._watch_heartbeats(progress)
        self._forward_metrics()
        if self.on_progress is not None:
            self.on_progress(progress)
        return self.finished

    def run(self, timeout: float = 1.0) -> None:
        """Every job to completion (raises RunFailed when a block exhausts its restarts)."""
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
            raise self.policy.failure(job, error)
        self.store.incr(self.run_id, job, "restarts")
        n, most = self.policy.restarts[job], self.policy.max_restarts
        log.warning("%s failed (%s); restart %d/%d from its checkpoint", job, describe(error), n, most)
        self._start(job)

    def _watch_heartbeats(self, progress: dict[JobId, dict]) -> None:
        now = self.clock()
        for job, p in progress.items():
            if p.get("heartbeat") != self.beat.get(job):
                self.beat[job], self.alive[job] = p.get("heartbeat"), now
                self.reported.add(job)
        for job in sorted(self.workers.running() - self.done):
            short = None if job in self.reported else self.workers.unschedulable(job)
            if short is not None:  # waiting for resources, not hung: an autoscaler may add them
                since = self.waiting.setdefault(job, self.alive[job])
                self.alive[job] = now  # its start-up time counts from when it can be placed
                failure = self.policy.unscheduled(job, now - since, short)
                if failure is not None:
                    raise failure
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
        for job in self.jobs:
            self.cursors[job], entries = self.store.read_metrics(self.run_id, job, self.cursors[job])
            run = self.manifest.job(job).mlflow_run
            for m in entries:
                self.tracker.log_metrics(run, {k: v for k, v in m.items() if k != "step"}, m["step"])
