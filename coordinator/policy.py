"""What the controller does when a block's worker fails or goes silent.

Two rules, both per block:

* **Restart or fail.** A worker that raised (its own exception, or its process died) is restarted
  from its checkpoint, at most ``workers.max_restarts`` times; one more failure fails the block with
  one line naming it: ``blocks/1 failed 3 times, last: ValueError: ...``. A deterministic
  error -- bad data (``DataError``: a row or shard the reader refuses), a broken config rule
  (``ConfigError``) or a checkpoint of another plan (``CheckpointError``) -- fails the block at
  once: a restart would read the same row or file again. A failed block does not stop the others:
  they finish (and the run registers them) before the controller raises ``BlocksFailed``.
* **Stale heartbeat.** A worker reports (and renews its lease) at least every ``lease_seconds / 3``.
  One whose heartbeat has not changed for longer than ``workers.lease_seconds`` is hung: the
  controller stops it and treats it as failed (restart from its checkpoint, counted against
  ``max_restarts``). Its lease lapsed at the same moment, so the new worker can take the block.
  The controller times the silence with its own clock, from the moment it last saw the heartbeat
  change or (re)started the worker, whichever is later (no clock is compared across machines). A
  worker that has not reported since it was (re)started gets ``startup_seconds`` instead: a Ray
  actor's process start and imports take 10+ s, far longer on a loaded machine.
* **Unschedulable.** A worker that has not reported while its actor asks for more than the
  cluster has (``WorkerGroup.unschedulable``) is waiting for resources, not hung: an autoscaler
  may add them. After ``workers.schedule_timeout`` the run fails in one line naming what is
  missing (restarting would wait the same way).

An external block (``workers.external``) is not ours to restart: a stale external worker is
logged once and waited for; its lapsed lease lets another ``python -m worker`` take the block.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from dblocks.datacard import DataError
from dblocks.errors import ConfigError
from worker.record import JobId
from worker.storage import CheckpointError

DETERMINISTIC = (DataError, ConfigError, CheckpointError)  # the same input fails the same way: restarting cannot help


class RunFailed(RuntimeError):
    """A block failed for good (one line, naming it); ``job`` and ``reason`` (its last error, one line)
    when it is one block's failure."""

    def __init__(self, message: str, job: JobId | None = None, reason: str | None = None):
        super().__init__(message)
        self.job, self.reason = job, reason or message


class BlocksFailed(RunFailed):
    """Blocks that failed for good, raised once every other block has finished: ``failures`` (job ->
    its RunFailed) and ``done`` (the jobs that finished). Its message joins the failures' messages."""

    def __init__(self, failures: dict[JobId, RunFailed], done: set[JobId]):
        super().__init__("; ".join(str(f) for f in failures.values()))
        self.failures, self.done = dict(failures), set(done)


class RunPartial(RunFailed):
    """The run ended with some blocks failed (the finished ones registered): one line with a resume hint."""


class StaleHeartbeat(TimeoutError):
    """A worker stopped reporting for longer than its lease."""


class Decision(enum.Enum):
    RESTART = "restart"
    FAIL = "fail"


_TYPED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Heartbeat|Warning)\b")


def describe(error: BaseException) -> str:
    """``Type: message`` on one line (the last line of a traceback a Ray error carries), at most 300 chars."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if not _TYPED.match(last):
        last = f"{type(error).__name__}: {last}" if last else type(error).__name__
    return last[:300]


@dataclass
class FailurePolicy:
    max_restarts: int  # workers.max_restarts
    lease_seconds: float  # workers.lease_seconds
    startup_seconds: float = 120.0  # silence allowed before a (re)started worker's first report
    schedule_timeout: float = 600.0  # workers.schedule_timeout: waiting for resources the cluster lacks
    restarts: Counter = field(default_factory=Counter)  # restarts granted so far, per job

    def decide(self, job: JobId, error: BaseException) -> Decision:
        """Restart ``job`` (and count it) while restarts are left, else fail the run; a deterministic
        error fails it at once (a Ray actor's error is an instance of its cause's class too)."""
        if isinstance(error, DETERMINISTIC) or self.restarts[job] >= self.max_restarts:
            return Decision.FAIL
        self.restarts[job] += 1
        return Decision.RESTART

    def failure(self, job: JobId, error: BaseException) -> RunFailed:
        why = describe(error)
        if isinstance(error, DETERMINISTIC):
            return RunFailed(f"{job} failed, not restarted (it would fail the same way): {why}", job, why)
        return RunFailed(f"{job} failed {self.restarts[job] + 1} times, last: {why}", job, why)

    def unscheduled(self, job: JobId, waited: float, short: str) -> RunFailed | None:
        """The error a block whose actor has waited ``waited`` s for resources (``short``: what the
        cluster lacks) fails the run with, or None while it may still wait."""
        if waited <= self.schedule_timeout:
            return None
        why = f"not scheduled in {waited:.0f} s (workers.schedule_timeout={self.schedule_timeout:g}): {short}"
        return RunFailed(f"{job} was {why}", job, why)

    def stale(self, progress: Mapping[str, str], quiet: float, reported: bool) -> StaleHeartbeat | None:
        """The error a hung worker counts as, or None while it is alive (or done). ``quiet``: seconds
        since its heartbeat last changed or it was (re)started; ``reported``: it has reported since."""
        if progress.get("state") == "done":
            return None
        if reported and quiet > self.lease_seconds:
            return StaleHeartbeat(f"no heartbeat for {quiet:.0f} s (workers.lease_seconds={self.lease_seconds:g})")
        limit = max(self.lease_seconds, self.startup_seconds)
        if not reported and quiet > limit:
            return StaleHeartbeat(f"no heartbeat {quiet:.0f} s after its start (start-up may take {limit:g} s)")
        return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    code = 128 + 15


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after its MLflow runs were ended KILLED; ``code``: the exit status."""

    def __init__(self, run_id: str, code: int):
        super().__init__(f"run {run_id} interrupted")
        self.run_id, self.code = run_id, code
