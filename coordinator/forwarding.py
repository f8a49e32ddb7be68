"""MLflow off the critical path: every tracker call goes through one queue, delivered in order by one thread.

:class:`QueuedTracker` wraps a :class:`~coordinator.tracking.Tracker`:

- logging (``log_metrics``, ``log_params``, ``log_dict``, ``log_artifact``) returns at once; a
  metrics point keeps the time it was logged, not the time it was delivered;
- the run, registry and end calls (``start_run``, ``reopen``, ``register_block``, ``set_alias``,
  ``end``) wait for their turn and their result, so each one also waits for everything queued
  before it (registration and the end of a run flush the queue first);
- one thread delivers the calls in order. A call that fails because MLflow is unreachable (a
  connection error, a timeout, a 5xx) is retried, backing off from 1 s to 15 s: logging for as
  long as it takes, a waiting call for up to ``wait_seconds`` (``mlflow.wait_seconds``), after
  which it raises a one-line :class:`TrackingError` -- and, until MLflow answers again, so does
  every later waiting call at its first failure. A call MLflow refuses (a 4xx) is dropped with a
  one-line warning (logging) or raised (waiting calls). One warning line when MLflow goes down,
  one when it is back, one when a waiting call starts waiting;
- ``when_delivered(fn)`` runs ``fn`` on that thread once everything queued before it has been
  delivered or dropped: the controller advances its metrics cursors in the run store with it;
- ``flush(timeout)`` waits for the queue to drain; ``close()`` flushes briefly and stops.

MLflow's client retries a failed HTTP request itself for minutes by default; the queue cuts that to
a few seconds (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and friends, unless set in the environment) so
that its own backoff decides, and says when MLflow is down.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dblocks.errors import one_line
from worker.redaction import redact

from .tracking import Tracker, TrackingError, unreachable

log = logging.getLogger(__name__)

# MLflow's HTTP client: 2 quick retries (~3 s) and a 60 s socket timeout instead of 7 retries over ~4 min.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
BACKOFF = (1.0, 15.0)  # seconds between attempts while MLflow is unreachable: first, most


def reason(e: BaseException) -> str:
    """What went wrong, short: the innermost cause ("Connection refused", "timed out", a 5xx's message)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return re.sub(r"^\[Errno -?\d+\] ", "", redact(one_line(e)))[:160]


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    what: str  # for messages: "register debug-block0"
    future: Future | None = None  # a waiting call's result
    deadline: float = float("inf")  # monotonic: a waiting call gives up then
    tracker: bool = True  # False: a when_delivered callback (never retried)


class QueuedTracker:
    """A Tracker whose logging never waits for MLflow (see the module docstring)."""

    def __init__(self, inner: Tracker, wait_seconds: float = 1800.0, backoff: tuple[float, float] = BACKOFF):
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        self.inner, self.uri, self.wait_seconds, self.backoff = inner, inner.uri, wait_seconds, backoff
        self.experiment_id = inner.experiment_id
        inner.system_sink = self.log_metrics
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # a line per HTTP retry: we say it once
        self._calls: deque[_Call] = deque()  # the head is being delivered; it leaves once done
        self._cond = threading.Condition()
        self._closed = False
        self.down_since: float | None = None  # monotonic: when MLflow stopped answering
        self.gave_up = False  # a waiting call timed out and MLflow has not answered since
        self._told_waiting = False
        self.dropped = 0  # calls MLflow refused
        self._thread = threading.Thread(target=self._deliver, name="tracker-queue", daemon=True)
        self._thread.start()

    # ---- logging: returns at once ---------------------------------------------------------
    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: float | None = None) -> None:
        when = time.time() if timestamp is None else timestamp
        metrics = dict(metrics)
        self._put(_Call(lambda: self.inner.log_metrics(run_id, metrics, step, when), f"log metrics of run {run_id}"))

    def log_params(self, run_id: str, params: dict) -> None:
        params = copy.deepcopy(params)
        self._put(_Call(lambda: self.inner.log_params(run_id, params), f"log params of run {run_id}"))

    def log_dict(self, run_id: str, obj: dict, path: str) -> None:
        obj = copy.deepcopy(obj)
        self._put(_Call(lambda: self.inner.log_dict(run_id, obj, path), f"log {path} to run {run_id}"))

    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
        """``local`` is read when the call is delivered: it must stay where it is."""
        call = _Call(lambda: self.inner.log_artifact(run_id, local, artifact_path), f"log {local} to run {run_id}")
        self._put(call)

    def when_delivered(self, fn: Callable[[], None]) -> None:
        self._put(_Call(fn, "after delivery", tracker=False))

    # ---- runs and registry: wait for their turn and result ---------------------------------------
    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str:
        return self._wait(lambda: self.inner.start_run(name, tags, parent_id, system_metrics), f"start run {name}")

    def reopen(self, run_id: str, system_metrics: bool = False) -> None:
        self._wait(lambda: self.inner.reopen(run_id, system_metrics), f"reopen run {run_id}")

    def end(self, run_id: str, ok: bool, killed: bool = False) -> None:
        self._wait(lambda: self.inner.end(run_id, ok, killed), f"end run {run_id}")

    def register_block(
        self, run_id: str, export_file: Path, name: str, tags: dict, alias: str, description: str = ""
    ) -> str:
        return self._wait(
            lambda: self.inner.register_block(run_id, export_file, name, tags, alias, description), f"register {name}"
        )

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._wait(lambda: self.inner.set_alias(name, alias, version), f"set alias {alias} of {name}")

    # ---- the queue --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) until every queued call is delivered or dropped."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._calls, timeout)

    def pending(self) -> int:
        with self._cond:
            return len(self._calls)

    def close(self, timeout: float = 30.0) -> None:
        """Flush (not at all once MLflow has been given up on), stop the thread; say what was left undelivered."""
        drained = self.flush(0 if self.gave_up else timeout)
        with self._cond:
            self._closed = True
            left = len(self._calls)
            self._cond.notify_all()
        if drained:
            self._thread.join()
        else:
            log.warning("%d tracking calls were not delivered to MLflow at %s (unreachable)", left, redact(self.uri))

    def _put(self, call: _Call) -> None:
        """Queue ``call``; once closed, logging is dropped (a sampler may still run) and a waiting call raises."""
        with self._cond:
            if self._closed:
                if call.future is not None:
                    raise TrackingError(f"could not {call.what}: the run's tracker is closed")
                return
            self._calls.append(call)
            self._cond.notify_all()

    def _wait(self, fn: Callable[[], Any], what: str):
        call = _Call(fn, what, Future())
        call.deadline = time.monotonic() + (0.0 if self.gave_up else self.wait_seconds)
        self._put(call)
        return call.future.result()

    def _deliver(self) -> None:
        """The thread: the head call until it succeeds or is dropped, then the next."""
        delay = self.backoff[0]
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._calls or self._closed)
                if not self._calls:
                    return
                call = self._calls[0]
            try:
                result = call.fn()
            except Exception as e:  # noqa: BLE001  (whatever MLflow raises: retried, dropped or handed to the waiter)
                if call.tracker and unreachable(e):
                    self._unreachable(e)
                    if self._back_off(delay):
                        return
                    delay = min(2 * delay, self.backoff[1])
                    continue
                self._done(call, error=e)
            else:
                if call.tracker:
                    self._reachable()
                    delay = self.backoff[0]
                self._done(call, result=result)

    def _done(self, call: _Call, result=None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._calls and self._calls[0] is call:
                self._calls.popleft()
            self._cond.notify_all()
        if call.future is not None:
            if error is None:
                call.future.set_result(result)
            else:
                call.future.set_exception(error)
        elif error is not None:
            why = reason(error)
            if call.tracker:
                self.dropped += 1
                log.warning("MLflow refused to %s (%s); dropped", call.what, why)
            else:
                log.warning("tracking: a step after delivery failed (%s)", why)

    def _back_off(self, delay: float) -> bool:
        """Sleep ``delay`` seconds, or less when a waiting call's time is up (the next attempt then
        tells whether MLflow is still down); True when the queue was closed meanwhile."""
        end = time.monotonic() + delay
        with self._cond:
            while (left := end - time.monotonic()) > 0 and not self._due():
                if self._cond.wait_for(lambda: self._closed or self._due(), min(left, 1.0)):
                    break
            return self._closed

    def _due(self) -> bool:
        now = time.monotonic()
        return any(c.future is not None and c.deadline <= now for c in self._calls)

    def _unreachable(self, e: BaseException) -> None:
        with self._cond:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning(
                    "MLflow at %s is unreachable (%s); training goes on, %d tracking calls queued, retrying",
                    redact(self.uri),
                    reason(e),
                    len(self._calls),
                )
        self._expire()
        with self._cond:
            waiting = [c for c in self._calls if c.future is not None]
            if waiting and not self._told_waiting:
                self._told_waiting = True
                left = max(c.deadline for c in waiting) - time.monotonic()
                log.warning(
                    "%s: waiting for MLflow at %s to come back (up to %.0f s)", waiting[0].what, redact(self.uri), left
                )

    def _expire(self) -> None:
        """After a failed attempt: every waiting call whose time is up raises a one-line TrackingError."""
        now = time.monotonic()
        with self._cond:
            expired = [c for c in self._calls if c.future is not None and c.deadline <= now]
            for c in expired:
                self._calls.remove(c)
            if expired:
                self.gave_up = True
                self._cond.notify_all()
        for c in expired:
            c.future.set_exception(
                TrackingError(
                    f"MLflow at {redact(self.uri)} has been unreachable for {now - self.down_since:.0f} s "
                    f"(mlflow.wait_seconds={self.wait_seconds:g}): could not {c.what}; the trained blocks and the "
                    "run are kept: resume=<run id> (output_dir/last_run) finishes it once MLflow is back"
                )
            )

    def _reachable(self) -> None:
        with self._cond:
            down, self.down_since = self.down_since, None
            self.gave_up = self._told_waiting = False
            left = len(self._calls) - 1
        if down is not None:
            log.warning(
                "MLflow at %s is back after %.0f s; delivering %d queued tracking calls",
                redact(self.uri),
                time.monotonic() - down,
                left,
            )
