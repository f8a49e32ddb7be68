"""The run store: the manifest, one work-unit queue per job, leases, progress, metrics.

:class:`RunStore` is the interface the coordinator and the workers use; :class:`RedisStore` keeps it
in Redis (every process of a distributed run shares it), :class:`MemoryStore` in this process (the
same layout and semantics: tests, inline workers). ``open_store(url)`` opens either by URL.

Layout (``{run}`` is the run id, ``{job}`` a job such as ``blocks/0`` or ``e2e/0``), built by ``keys``:

    dblocks:runs                      set     every run id this store knows
    dblocks:{run}:manifest            string  the JSON Manifest (worker/record.py)
    dblocks:{run}:{job}:units         stream  one entry per work unit, field ``unit`` = JSON;
                                              consumer group ``workers``
    dblocks:{run}:{job}:lease         string  consumer that owns the job now; expires unless renewed
    dblocks:{run}:{job}:progress      hash    state, units_done/total, samples, loss, samples_per_s,
                                              heartbeat, pid, host, consumer, restarts, ...
    dblocks:{run}:{job}:metrics       stream  per-unit metrics (the coordinator forwards them to the tracker)
    dblocks:{run}:cursors             hash    per job: the last metrics entry (``{job}``) and the highest step
                                              (``{job} step``) the tracker has received

A worker acknowledges a unit only after a durable checkpoint covers it; a new owner of a job first
claims every pending (delivered, unacknowledged) entry, so no unit is lost when a worker dies.

**Redis outages.** Every RedisStore talks to Redis through :class:`Reconnecting` (``self.r``): a
command, pipeline or script that meets a dropped connection is retried with bounded exponential
backoff until Redis is back, for at most ``redis.reconnect_seconds`` per outage (then one
StoreError naming Redis and its URL, password masked). A retry may repeat a command whose reply
was lost after Redis ran it; each method is safe against that: ``create_run`` checks whether its
own manifest landed, ``log_metrics`` does not append an entry equal to the stream's last one,
``next_units`` first takes back entries a lost reply delivered to it (pending for this consumer,
after the last one it returned), leases and progress are plain SETs and HSETs, acks are
idempotent. Only ``incr`` (diagnostic counters: ``units_applied``, ``restarts``) may count once
more. During an outage ``report`` does not wait: the newest fields are kept and go out before the
next command that reaches Redis, so a worker keeps training its unit; nothing else is written while
Redis is away, and acks only follow durable checkpoints, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from dblocks.config import RedisConfig
from dblocks.errors import one_line
from dblocks.units import WorkUnit

from .record import JobId, Manifest
from .redaction import redact

log = logging.getLogger(__name__)

GROUP = "workers"  # the consumer group of every units stream
METRICS_MAXLEN = 100_000  # metrics entries kept per job (older ones are trimmed)

Units = list[tuple[str, WorkUnit]]  # (entry id, unit), in stream order
RECONNECT_SECONDS = RedisConfig.reconnect_seconds  # how long one Redis outage may last (redis.reconnect_seconds)
BACKOFF = (0.1, 5.0)  # seconds: the first wait after a failure, doubled up to the cap
T = TypeVar("T")


class StoreError(RuntimeError):
    """Store unreachable, unknown run, job owned by someone else: one line that says what to fix."""


@dataclass(frozen=True)
class Keys:
    """Every key name of the layout above: the one place they are spelled."""

    prefix: str = "dblocks"

    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    def manifest(self, run: str) -> str:
        return f"{self.prefix}:{run}:manifest"

    def units(self, run: str, job: JobId | str) -> str:
        return f"{self.prefix}:{run}:{job}:units"

    def lease(self, run: str, job: JobId | str) -> str:
        return f"{self.prefix}:{run}:{job}:lease"

    def progress(self, run: str, job: JobId | str) -> str:
        return f"{self.prefix}:{run}:{job}:progress"

    def metrics(self, run: str, job: JobId | str) -> str:
        return f"{self.prefix}:{run}:{job}:metrics"

    def cursors(self, run: str) -> str:
        return f"{self.prefix}:{run}:cursors"


keys = Keys()


class RunStore(Protocol):
    """What the coordinator and the workers read and write; ``job`` is a JobId everywhere."""

    url: str

    def create_run(self, manifest: Manifest, units: dict[JobId, list[WorkUnit]]) -> None:
        """Write the manifest and enqueue every job's units, all or nothing; an existing run is an error."""

    def update_manifest(self, manifest: Manifest) -> None: ...

    def manifest(self, run: str) -> Manifest: ...

    def acquire(self, run: str, job: JobId, consumer: str, ttl: float) -> None:
        """Own ``job`` for ``ttl`` seconds (renewed by ``report``); the same consumer may retake it."""

    def release(self, run: str, job: JobId, consumer: str) -> None: ...

    def claim_pending(self, run: str, job: JobId, consumer: str) -> Units:
        """Take over every unit delivered but not acknowledged, in stream order (after ``acquire``)."""

    def next_units(self, run: str, job: JobId, consumer: str, count: int = 1, block_ms: int | None = 1000) -> Units:
        """Up to ``count`` units never delivered before, waiting up to ``block_ms`` for one."""

    def ack(self, run: str, job: JobId, ids: list[str]) -> None: ...

    def queue_counts(self, run: str, job: JobId) -> dict[str, int]:
        """``entries`` in the queue, and how many of them are ``pending`` (delivered, unacknowledged)."""

    def report(self, run: str, job: JobId, owner: str | None = None, ttl: float | None = None, **fields) -> None:
        """Update the job's progress and its ``heartbeat``; renew ``owner``'s lease when ``ttl`` is given."""

    def progress(self, run: str, job: JobId) -> dict[str, str]: ...

    def incr(self, run: str, job: JobId, field: str, by: int = 1) -> int: ...

    def log_metrics(self, run: str, job: JobId, metrics: dict) -> None: ...

    def read_metrics(self, run: str, job: JobId, after: str = "0") -> tuple[str, list[dict]]:
        """Metrics entries after entry id ``after`` ("0": from the start); returns (last id, entries)."""

    def cursors(self, run: str) -> dict[str, str]:
        """The run's forwarding cursors (name -> value) as ``set_cursors`` left them; {} at first."""

    def set_cursors(self, run: str, values: dict[str, str]) -> None:
        """Set these cursors (the others stay), all at once."""

    def units_from(self, run: str, job: JobId, seq: int) -> Units:
        """Every unit of ``job`` from unit ``seq`` on, in stream order, whatever its delivery or ack state
        (acknowledged units stay in the stream): what a worker re-applies after falling back to an older
        checkpoint."""


# ---- shared by both implementations -------------------------------------------------------
def _flat(v) -> str:
    """A progress value as the hash stores it: JSON for containers, text for the rest."""
    return json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)


def _progress_fields(fields: dict) -> dict[str, str]:
    return {**{k: _flat(v) for k, v in fields.items()}, "heartbeat": _flat(time.time())}


def _unit_entry(unit: WorkUnit) -> dict[str, str]:
    return {"unit": json.dumps(unit.to_dict())}


def _units(entries: list[tuple[str, dict]]) -> Units:
    return [(i, WorkUnit.from_dict(json.loads(f["unit"]))) for i, f in entries if f]


def _exists(run: str, where: str) -> StoreError:
    return StoreError(f"run {run} already exists in {where}; pass resume={run} to continue it")


def _no_run(run: str, where: str, known: set[str]) -> StoreError:
    names = ", ".join(sorted(known)[-5:]) or "none"
    return StoreError(f"run={run}: no such run in {where} (known: {names})")


class LeaseHeld(StoreError):
    """A lease another consumer holds (``owner``: its name)."""

    def __init__(self, message: str, owner: str | None):
        super().__init__(message)
        self.owner = owner


def _owned(run: str, job: JobId, owner: str | None, ttl: float) -> LeaseHeld:
    return LeaseHeld(
        f"{job} of run {run} is owned by worker {owner!r}; wait {ttl:.0f} s for its lease to lapse or stop it", owner
    )


def _no_queue(run: str, job: JobId) -> StoreError:
    return StoreError(f"run {run} has no work-unit queue for {job}; check the run id and the job")


# ---- Redis ----------------------------------------------------------------------------------
def _transient(e: BaseException) -> bool:
    """A dropped or refused connection, a timeout, Redis still loading its AOF: worth retrying (a
    wrong password is not)."""
    return isinstance(e, (redis.ConnectionError, redis.TimeoutError)) and not isinstance(e, redis.AuthenticationError)


class Reconnecting:
    """A ``redis.Redis`` that rides out an outage: every command (``r.xadd(...)``), pipeline
    (``r.pipeline()``, recorded and replayed whole) and ``call(fn)`` is retried on a dropped
    connection with bounded exponential backoff (``BACKOFF``), for at most ``seconds`` since the
    outage began (shared by every thread of the store), then a one-line StoreError. ``before``, when
    set, runs first in every try (the store sends the progress an outage held back). ``client`` is
    the plain client (one try), for code that retries itself."""

    def __init__(self, url: str, seconds: float):
        self.url, self.seconds = url, seconds
        self.client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=3, socket_timeout=30, retry=Retry(NoBackoff(), 0)
        )
        self.before: Callable[[], None] | None = None
        self._down_since: float | None = None  # monotonic time of the outage's first failure
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` (which uses ``client``) until it gets through, for at most the outage budget."""
        delay = BACKOFF[0]
        while True:
            ok, out = self._try(fn)
            if ok:
                return out
            with self._lock:
                since = self._down_since
            left = self.seconds - (time.monotonic() - since) if since is not None else 0.0
            time.sleep(max(0.0, min(delay, left)))
            delay = min(2 * delay, BACKOFF[1])

    def attempt(self, fn: Callable[[], object]) -> bool:
        """``fn()`` once: False when Redis is away (still within the budget), True when it got through."""
        return self._try(fn)[0]

    def _try(self, fn: Callable[[], T]) -> tuple[bool, T | None]:
        try:
            if self.before is not None:
                self.before()
            out = fn()
        except Exception as e:
            if not _transient(e):
                raise
            self._failed(e)
            return False, None
        if self._down_since is not None:
            self._back()
        return True, out

    def _failed(self, e: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                log.warning(
                    "Redis at %s is unreachable (%s); retrying for up to %g s (redis.reconnect_seconds)",
                    redact(self.url),
                    one_line(e),
                    self.seconds,
                )
            if now - self._down_since >= self.seconds:
                raise StoreError(
                    f"Redis at {redact(self.url)} unreachable for {now - self._down_since:.0f} s ({one_line(e)}); "
                    f"restart redis-server on its data (AOF), or raise redis.reconnect_seconds={self.seconds:g}, "
                    "then resume the run"
                ) from None

    def _back(self) -> None:
        with self._lock:
            if self._down_since is not None:
                log.warning("Redis at %s is back after %.1f s", redact(self.url), time.monotonic() - self._down_since)
                self._down_since = None

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self, transaction)

    def register_script(self, script: str) -> Script:
        """A script whose calls (EVALSHA, SCRIPT LOAD after a restart emptied the cache) go through here."""
        return Script(self, script)

    def __getattr__(self, name: str):
        if name in ("client", "__setstate__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self.call(lambda: attr(*args, **kwargs))


class _Pipeline:
    """Commands recorded (``pipe.hset(...)``), then sent in one pipeline by ``execute()``, which is
    retried whole: redis-py's pipeline forgets its commands when it fails. With ``transaction``
    (MULTI/EXEC) Redis runs all or none of them; a connection lost before EXEC ran nothing."""

    def __init__(self, r: Reconnecting, transaction: bool):
        self._r, self._transaction = r, transaction
        self._calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs) -> _Pipeline:
            self._calls.append((name, args, kwargs))
            return self

        return record

    def execute(self) -> list:
        def send() -> list:
            pipe = self._r.client.pipeline(transaction=self._transaction)
            for name, args, kwargs in self._calls:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute()

        try:
            return self._r.call(send)
        finally:
            self._calls = []


# Append unless the stream's last entry is this very one: a retry after a lost reply adds nothing.
# (Each job's metrics have one writer, the lease holder, and every entry carries its time.)
_XADD_ONCE = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last and last[2][1] == 'm' and last[2][2] == ARGV[1] then return last[1] end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
"""


class RedisStore:
    """The store in Redis; every method is one or two commands, each riding out an outage of up to
    ``reconnect_seconds`` (see the module's docstring)."""

    def __init__(self, url: str, reconnect_seconds: float = RECONNECT_SECONDS):
        self.url, self.where = url, f"Redis at {redact(url)}"
        self.r = Reconnecting(url, reconnect_seconds)
        self._reports: dict[tuple[str, str], tuple[dict, tuple[str, float] | None]] = {}  # held back by an outage
        self._reports_lock = threading.Lock()
        self._returned: dict[tuple[str, str], str] = {}  # (stream, consumer) -> last entry id returned to it
        try:
            self.r.client.ping()  # once: an address that never answered is a mistake, not an outage
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(
                f"redis.url={redact(url)}: cannot reach Redis ({one_line(e)}); start redis-server or fix the URL"
            ) from None
        self.r.before = self._send_reports

    @property
    def reconnect_seconds(self) -> float:
        return self.r.seconds

    @reconnect_seconds.setter
    def reconnect_seconds(self, seconds: float) -> None:
        self.r.seconds = seconds

    # ---- manifest ----
    def create_run(self, manifest: Manifest, units: dict[JobId, list[WorkUnit]]) -> None:
        """One MULTI/EXEC: the manifest, the run's id in the runs set, each job's stream, group and progress."""
        run, ours = manifest.run_id, manifest.to_json()

        tries = 0

        def create() -> None:  # one try; a retry finds our manifest if a lost reply's EXEC ran
            nonlocal tries
            tries += 1
            theirs = self.r.client.get(keys.manifest(run))
            if theirs == ours and tries > 1:
                return
            if theirs is not None:
                raise _exists(run, self.where)
            pipe = self.r.client.pipeline(transaction=True)
            pipe.set(keys.manifest(run), ours)
            pipe.sadd(keys.runs, run)
            for job, job_units in units.items():
                stream = keys.units(run, job)
                for u in job_units:
                    pipe.xadd(stream, _unit_entry(u))
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
                progress = {"state": "queued", "units_done": 0, "units_total": len(job_units)}
                pipe.hset(keys.progress(run, job), mapping=progress)
            pipe.execute()

        self.r.call(create)

    def update_manifest(self, manifest: Manifest) -> None:
        self.r.set(keys.manifest(manifest.run_id), manifest.to_json())

    def manifest(self, run: str) -> Manifest:
        raw = self.r.get(keys.manifest(run))
        if raw is None:
            raise _no_run(run, self.where, self.r.smembers(keys.runs))
        return Manifest.from_json(raw)

    # ---- leases ----
    def acquire(self, run: str, job: JobId, consumer: str, ttl: float) -> None:
        key, px = keys.lease(run, job), int(ttl * 1000)
        if self.r.set(key, consumer, nx=True, px=px):
            return
        owner = self.r.get(key)
        if owner == consumer and self.r.set(key, consumer, xx=True, px=px):
            return
        raise _owned(run, job, owner, ttl)

    def release(self, run: str, job: JobId, consumer: str) -> None:
        key = keys.lease(run, job)
        if self.r.get(key) == consumer:
            self.r.delete(key)

    # ---- work units ----
    @contextlib.contextmanager
    def _queue(self, run: str, job: JobId):
        """A job without a queue (no consumer group) is a one-line StoreError."""
        try:
            yield keys.units(run, job)
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                raise _no_queue(run, job) from None
            raise

    def claim_pending(self, run: str, job: JobId, consumer: str) -> Units:
        """XAUTOCLAIM every pending entry (a dead worker's, or our own before a restart), then read
        back all of ours (XREADGROUP from 0). Call once, after ``acquire``."""
        with self._queue(run, job) as stream:
            start = "0-0"
            while True:
                start = self.r.xautoclaim(stream, GROUP, consumer, min_idle_time=0, start_id=start, count=100)[0]
                if start == "0-0":
                    break
            entries = _messages(self.r.xreadgroup(GROUP, consumer, {stream: "0"}, count=1_000_000))
        return self._returning(stream, consumer, entries)

    def next_units(self, run: str, job: JobId, consumer: str, count: int = 1, block_ms: int | None = 1000) -> Units:
        """XREADGROUP ``>``. Redis counts entries as delivered when it sends them: a retry first reads
        back this consumer's pending entries after the last one it was given (a lost reply's)."""
        tries = 0

        def read() -> list[tuple[str, dict]]:
            nonlocal tries
            tries += 1
            if tries > 1:
                after = self._returned.get((stream, consumer), "0")
                lost = _messages(self.r.client.xreadgroup(GROUP, consumer, {stream: after}, count=count))
                if lost:
                    return lost
            return _messages(self.r.client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count, block=block_ms))

        with self._queue(run, job) as stream:
            entries = self.r.call(read)
        return self._returning(stream, consumer, entries)

    def _returning(self, stream: str, consumer: str, entries: list[tuple[str, dict]]) -> Units:
        if entries:
            self._returned[(stream, consumer)] = entries[-1][0]
        return _units(entries)

    def ack(self, run: str, job: JobId, ids: list[str]) -> None:
        if ids:
            with self._queue(run, job) as stream:
                self.r.xack(stream, GROUP, *ids)

    def queue_counts(self, run: str, job: JobId) -> dict[str, int]:
        with self._queue(run, job) as stream:
            return {"entries": self.r.xlen(stream), "pending": self.r.xpending(stream, GROUP)["pending"]}

    # ---- progress and metrics ----
    def report(self, run: str, job: JobId, owner: str | None = None, ttl: float | None = None, **fields) -> None:
        """Sent at once when Redis is there; during an outage the newest fields (and lease) are kept
        and sent before the next command that reaches it, so the caller goes on training."""
        key = (run, str(job))
        with self._reports_lock:
            held, lease = self._reports.get(key, ({}, None))
            lease = (owner, ttl) if owner is not None and ttl is not None else lease
            self._reports[key] = ({**held, **_progress_fields(fields)}, lease)
        self.r.attempt(lambda: None)  # `before` sends them; a StoreError once the outage outlasts the budget

    def _send_reports(self) -> None:
        """Every held-back report in one pipeline (HSET, SET PX: a repeat is harmless); on failure
        they are kept, under any newer fields."""
        with self._reports_lock:
            reports, self._reports = self._reports, {}
        if not reports:
            return
        try:
            pipe = self.r.client.pipeline(transaction=False)
            for (run, job), (fields, lease) in reports.items():
                pipe.hset(keys.progress(run, job), mapping=fields)
                if lease is not None:
                    pipe.set(keys.lease(run, job), lease[0], px=int(lease[1] * 1000))
            pipe.execute()
        except BaseException:
            with self._reports_lock:
                for key, (fields, lease) in reports.items():
                    newer, newer_lease = self._reports.get(key, ({}, None))
                    self._reports[key] = ({**fields, **newer}, newer_lease or lease)
            raise

    def progress(self, run: str, job: JobId) -> dict[str, str]:
        return self.r.hgetall(keys.progress(run, job))

    def incr(self, run: str, job: JobId, field: str, by: int = 1) -> int:
        return self.r.hincrby(keys.progress(run, job), field, by)

    def log_metrics(self, run: str, job: JobId, metrics: dict) -> None:
        """XADD (MAXLEN ~), as a script that adds nothing when the last entry is this one (a retry)."""
        self.r.eval(_XADD_ONCE, 1, keys.metrics(run, job), json.dumps(metrics), METRICS_MAXLEN)

    def read_metrics(self, run: str, job: JobId, after: str = "0") -> tuple[str, list[dict]]:
        out, last = [], after
        for entry_id, fields in self.r.xrange(keys.metrics(run, job), min=f"({after}" if after != "0" else "-"):
            out.append(json.loads(fields["m"]))
            last = entry_id
        return last, out

    def cursors(self, run: str) -> dict[str, str]:
        return self.r.hgetall(keys.cursors(run))

    def set_cursors(self, run: str, values: dict[str, str]) -> None:
        self.r.hset(keys.cursors(run), mapping=values)

    def units_from(self, run: str, job: JobId, seq: int) -> Units:
        """XRANGE over the job's units stream, 1000 entries a call."""
        out, start, page = [], "-", 1000
        while True:
            entries = self.r.xrange(keys.units(run, job), min=start, max="+", count=page)
            out += [(i, u) for i, u in _units(entries) if u.seq >= seq]
            if len(entries) < page:
                return out
            start = f"({entries[-1][0]}"


def _messages(entries) -> list[tuple[str, dict]]:
    """XREADGROUP's reply [(stream, [(id, fields), ...])] as one list of (id, fields)."""
    return [msg for _, msgs in entries or [] for msg in msgs]


# ---- in this process ------------------------------------------------------------------------
def _entry_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class _Stream:
    """A Redis stream with (at most) one consumer group: entries in id order, the group's
    last-delivered position and its pending entries (id -> consumer)."""

    entries: list[tuple[str, dict]] = field(default_factory=list)
    last: int = 0  # id counter: entry n has id "n-0"
    delivered: int = 0  # entries[:delivered] were delivered to the group
    pending: dict[str, str] = field(default_factory=dict)
    group: bool = False

    def add(self, fields: dict, maxlen: int | None = None) -> str:
        self.last += 1
        self.entries.append((f"{self.last}-0", fields))
        if maxlen is not None and len(self.entries) > maxlen:
            cut = len(self.entries) - maxlen
            del self.entries[:cut]
            self.delivered = max(self.delivered - cut, 0)
        return self.entries[-1][0]

    def after(self, cursor: str) -> list[tuple[str, dict]]:
        start = _entry_id(cursor)
        return [(i, f) for i, f in self.entries if _entry_id(i) > start]


@dataclass
class _Lease:
    owner: str
    expires: float


class MemoryStore:
    """The store in this process: the same keys and semantics as RedisStore (a lock makes it safe
    for a worker in another thread; ``next_units`` waits on a condition like a blocking read)."""

    def __init__(self, url: str = "memory://local"):
        self.url, self.where = url, f"the in-memory store {url}"
        self._lock = threading.Condition()
        self._strings: dict[str, str] = {}  # manifests (JSON)
        self._runs: set[str] = set()
        self._streams: dict[str, _Stream] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._leases: dict[str, _Lease] = {}

    # ---- manifest ----
    def create_run(self, manifest: Manifest, units: dict[JobId, list[WorkUnit]]) -> None:
        run = manifest.run_id
        with self._lock:
            if keys.manifest(run) in self._strings:
                raise _exists(run, self.where)
            self._strings[keys.manifest(run)] = manifest.to_json()
            self._runs.add(run)
            for job, job_units in units.items():
                stream = self._streams.setdefault(keys.units(run, job), _Stream())
                for u in job_units:
                    stream.add(_unit_entry(u))
                stream.group = True
                progress = {"state": "queued", "units_done": 0, "units_total": len(job_units)}
                self._hashes.setdefault(keys.progress(run, job), {}).update({k: _flat(v) for k, v in progress.items()})
            self._lock.notify_all()

    def update_manifest(self, manifest: Manifest) -> None:
        with self._lock:
            self._strings[keys.manifest(manifest.run_id)] = manifest.to_json()

    def manifest(self, run: str) -> Manifest:
        with self._lock:
            raw = self._strings.get(keys.manifest(run))
            if raw is None:
                raise _no_run(run, self.where, self._runs)
        return Manifest.from_json(raw)

    # ---- leases ----
    def _owner(self, key: str) -> str | None:
        lease = self._leases.get(key)
        if lease is not None and lease.expires <= time.time():
            del self._leases[key]
            return None
        return lease.owner if lease else None

    def acquire(self, run: str, job: JobId, consumer: str, ttl: float) -> None:
        key = keys.lease(run, job)
        with self._lock:
            owner = self._owner(key)
            if owner not in (None, consumer):
                raise _owned(run, job, owner, ttl)
            self._leases[key] = _Lease(consumer, time.time() + ttl)

    def release(self, run: str, job: JobId, consumer: str) -> None:
        key = keys.lease(run, job)
        with self._lock:
            if self._owner(key) == consumer:
                del self._leases[key]

    # ---- work units ----
    def _queue(self, run: str, job: JobId) -> _Stream:
        stream = self._streams.get(keys.units(run, job))
        if stream is None or not stream.group:
            raise _no_queue(run, job)
        return stream

    def claim_pending(self, run: str, job: JobId, consumer: str) -> Units:
        with self._lock:
            stream = self._queue(run, job)
            stream.pending = dict.fromkeys(stream.pending, consumer)
            return _units([(i, f) for i, f in stream.entries if i in stream.pending])

    def next_units(self, run: str, job: JobId, consumer: str, count: int = 1, block_ms: int | None = 1000) -> Units:
        """``block_ms`` as XREADGROUP's BLOCK: None returns at once, 0 waits for ever."""
        with self._lock:
            stream = self._queue(run, job)
            if block_ms is not None and stream.delivered == len(stream.entries):
                self._lock.wait_for(lambda: stream.delivered < len(stream.entries), block_ms / 1000 or None)
            new = stream.entries[stream.delivered : stream.delivered + count]
            stream.delivered += len(new)
            stream.pending.update(dict.fromkeys((i for i, _ in new), consumer))
            return _units(new)

    def ack(self, run: str, job: JobId, ids: list[str]) -> None:
        with self._lock:
            stream = self._queue(run, job)
            for i in ids:
                stream.pending.pop(i, None)

    def queue_counts(self, run: str, job: JobId) -> dict[str, int]:
        with self._lock:
            stream = self._queue(run, job)
            return {"entries": len(stream.entries), "pending": len(stream.pending)}

    # ---- progress and metrics ----
    def report(self, run: str, job: JobId, owner: str | None = None, ttl: float | None = None, **fields) -> None:
        with self._lock:
            self._hashes.setdefault(keys.progress(run, job), {}).update(_progress_fields(fields))
            if owner is not None and ttl is not None:
                self._leases[keys.lease(run, job)] = _Lease(owner, time.time() + ttl)

    def progress(self, run: str, job: JobId) -> dict[str, str]:
        with self._lock:
            return dict(self._hashes.get(keys.progress(run, job), {}))

    def incr(self, run: str, job: JobId, field: str, by: int = 1) -> int:
        with self._lock:
            h = self._hashes.setdefault(keys.progress(run, job), {})
            h[field] = str(int(h.get(field, "0")) + by)
            return int(h[field])

    def log_metrics(self, run: str, job: JobId, metrics: dict) -> None:
        with self._lock:
            self._streams.setdefault(keys.metrics(run, job), _Stream()).add({"m": json.dumps(metrics)}, METRICS_MAXLEN)

    def read_metrics(self, run: str, job: JobId, after: str = "0") -> tuple[str, list[dict]]:
        with self._lock:
            stream = self._streams.get(keys.metrics(run, job), _Stream())
            entries = stream.after(after)
        last = entries[-1][0] if entries else after
        return last, [json.loads(f["m"]) for _, f in entries]

    def cursors(self, run: str) -> dict[str, str]:
        with self._lock:
            return dict(self._hashes.get(keys.cursors(run), {}))

    def set_cursors(self, run: str, values: dict[str, str]) -> None:
        with self._lock:
            self._hashes.setdefault(keys.cursors(run), {}).update({k: str(v) for k, v in values.items()})

    def units_from(self, run: str, job: JobId, seq: int) -> Units:
        with self._lock:
            return [(i, u) for i, u in _units(self._queue(run, job).entries) if u.seq >= seq]


# ---- by URL ---------------------------------------------------------------------------------
_MEMORY: dict[str, MemoryStore] = {}
_MEMORY_LOCK = threading.Lock()


def memory_store(url: str, reconnect_seconds: float = RECONNECT_SECONDS) -> MemoryStore:
    """The process-wide MemoryStore named by ``url`` (a coordinator and an inline worker share it;
    nothing to reconnect)."""
    with _MEMORY_LOCK:
        if url not in _MEMORY:
            _MEMORY[url] = MemoryStore(url)
        return _MEMORY[url]


SCHEMES = {"redis": RedisStore, "rediss": RedisStore, "unix": RedisStore, "memory": memory_store}


def open_store(url: str, reconnect_seconds: float = RECONNECT_SECONDS) -> RunStore:
    """``redis://host:port/db`` (also rediss://, unix://): a RedisStore that rides out a Redis outage
    of up to ``reconnect_seconds``; ``memory://<name>``: this process's MemoryStore of that name."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise StoreError(f"redis.url={redact(url)!r}: expected redis://host:port/db or memory://<name>")
    return SCHEMES[scheme](url, reconnect_seconds)


def open_run_store(url: str, run_id: str) -> RunStore:
    """``open_store`` for a worker given only the URL (a Ray actor): it rides out outages as long as
    the run's ``redis.reconnect_seconds`` (its manifest's config) says."""
    store = open_store(url)
    seconds = store.manifest(run_id).config.get("redis", {}).get("reconnect_seconds")
    if seconds is not None and isinstance(store, RedisStore):
        store.reconnect_seconds = float(seconds)
    return store
