"""The run store, each scenario against both implementations (``store`` fixture: a MemoryStore and a
RedisStore on a real redis-server): manifest, unit queues, leases, reclaiming, progress, metrics."""

from __future__ import annotations

import time

import pytest

from dblocks.plan import BlockSpec
from dblocks.units import Shard, make_units
from worker.record import Job, JobId, Manifest
from worker.store import MemoryStore, RedisStore, StoreError, keys, open_store

B0 = JobId("blocks", 0)


def manifest(run: str = "r1") -> Manifest:
    spec = BlockSpec(0, 1, 0.002, 80.0, 0.002, 80.0, layer_start=0, layer_end=2)
    job = Job(B0, spec, "plan-abc", 5, "t-block0", "mlrun-0")
    shards = [Shard("s", 100)]
    return Manifest(run, "t", 1.5, {"seed": 0}, "/storage", shards, {B0: job}, "sqlite:///x.db", "parent")


def _run(store, run="r1", n=5) -> list:
    units = make_units(n * 10, 10, [Shard("s", 100)], seed=0, block=0)
    store.create_run(manifest(run), {B0: units})
    return units


def test_manifest_and_units_are_written_once(store):
    units = _run(store)
    assert store.manifest("r1") == manifest("r1")  # the typed record round-trips
    assert store.queue_counts("r1", B0) == {"entries": len(units), "pending": 0}
    assert store.progress("r1", B0) == {"state": "queued", "units_done": "0", "units_total": str(len(units))}
    with pytest.raises(StoreError, match="run r1 already exists .* pass resume=r1"):
        _run(store)
    assert store.queue_counts("r1", B0)["entries"] == len(units)  # nothing enqueued twice
    m = store.manifest("r1")
    m.registered[B0] = "3"
    store.update_manifest(m)
    assert store.manifest("r1").registered == {B0: "3"}


def test_unknown_run_and_job_fail_in_one_line(store):
    _run(store)
    with pytest.raises(StoreError, match=r"run=nope: no such run in .* \(known: r1\)"):
        store.manifest("nope")
    e1 = JobId("e2e", 0)
    with pytest.raises(StoreError, match=r"^run r1 has no work-unit queue for e2e/0; check the run id and the job$"):
        store.next_units("r1", e1, "a", block_ms=None)
    with pytest.raises(StoreError, match="no work-unit queue for e2e/0"):
        store.queue_counts("r1", e1)


def test_unreachable_redis_and_a_bad_url_fail_in_one_line():
    with pytest.raises(StoreError, match=r"redis.url=redis://127.0.0.1:1/0: cannot reach Redis"):
        RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match=r"redis.url='localhost:6379': expected redis://host:port/db or memory://"):
        open_store("localhost:6379")


def test_a_dead_consumers_unacknowledged_units_go_to_the_next_owner_in_order(store):
    units = _run(store)
    store.acquire("r1", B0, "a", ttl=0.2)
    got = store.next_units("r1", B0, "a", count=3)
    assert [u.seq for _, u in got] == [0, 1, 2]
    assert [u for _, u in got] == units[:3]
    store.ack("r1", B0, [got[0][0]])  # a checkpoint covered unit 0 only; then "a" dies
    with pytest.raises(StoreError, match="owned by worker 'a'"):
        store.acquire("r1", B0, "b", ttl=5)
    time.sleep(0.3)  # a's lease lapses
    store.acquire("r1", B0, "b", ttl=5)
    pending = store.claim_pending("r1", B0, "b")
    assert [u.seq for _, u in pending] == [1, 2]
    assert [i for i, _ in pending] == [i for i, _ in got[1:]]
    assert [u.seq for _, u in store.next_units("r1", B0, "b", count=10)] == [3, 4]
    assert store.next_units("r1", B0, "b", block_ms=50) == []
    store.ack("r1", B0, [i for i, _ in pending])
    assert store.queue_counts("r1", B0) == {"entries": len(units), "pending": 2}
    assert [u.seq for _, u in store.claim_pending("r1", B0, "c")] == [3, 4]  # every pending entry, whoever held it


def test_a_restarted_consumer_claims_its_own_pending_units(store):
    _run(store)
    store.acquire("r1", B0, "a", ttl=5)
    got = store.next_units("r1", B0, "a", count=2)
    store.acquire("r1", B0, "a", ttl=5)  # the same consumer retakes its lease
    assert store.claim_pending("r1", B0, "a") == got
    assert store.claim_pending("r1", B0, "a") == got  # idempotent until acknowledged


def test_progress_metrics_and_lease_renewal(store):
    _run(store)
    store.acquire("r1", B0, "a", ttl=0.3)
    before = time.time()
    store.report("r1", B0, "a", 5, state="training", units_done=2, loss=0.25, shape=[1, 2])
    time.sleep(0.4)  # renewed to 5 s by the report: still a's
    with pytest.raises(StoreError, match="owned by worker 'a'"):
        store.acquire("r1", B0, "b", ttl=5)
    p = store.progress("r1", B0)
    assert (p["state"], p["units_done"], p["loss"], p["shape"]) == ("training", "2", "0.25", "[1, 2]")
    assert before <= float(p["heartbeat"]) <= time.time()
    assert store.incr("r1", B0, "restarts") == 1 and store.incr("r1", B0, "restarts", 2) == 3
    assert store.progress("r1", B0)["restarts"] == "3"
    for k in range(3):
        store.log_metrics("r1", B0, {"step": k})
    last, first = store.read_metrics("r1", B0)
    assert [m["step"] for m in first] == [0, 1, 2]
    assert store.read_metrics("r1", B0, last) == (last, [])  # nothing new: the cursor stays
    store.log_metrics("r1", B0, {"step": 3, "loss": 0.5})
    last2, new = store.read_metrics("r1", B0, last)
    assert new == [{"step": 3, "loss": 0.5}] and last2 != last
    assert store.read_metrics("r1", JobId("e2e", 0)) == ("0", [])
    store.release("r1", B0, "b")  # not b's: a keeps it
    with pytest.raises(StoreError, match="owned by worker 'a'"):
        store.acquire("r1", B0, "b", ttl=5)
    store.release("r1", B0, "a")
    store.acquire("r1", B0, "b", ttl=5)


def test_redis_store_writes_the_documented_keys(redis_url):
    import redis

    store = RedisStore(redis_url)
    _run(store)
    store.acquire("r1", B0, "a", ttl=5)
    store.log_metrics("r1", B0, {"step": 1})
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert keys.progress("r1", B0) == "dblocks:r1:blocks/0:progress"
    assert r.smembers(keys.runs) == {"r1"}
    assert r.type(keys.manifest("r1")) == "string" and r.get(keys.lease("r1", B0)) == "a"
    assert r.type(keys.units("r1", B0)) == "stream" and r.xlen(keys.metrics("r1", B0)) == 1
    assert r.hgetall(keys.progress("r1", B0)) == store.progress("r1", B0)


def test_open_store_names_one_memory_store_per_process(redis_url):
    a = open_store("memory://shared-test")
    assert isinstance(a, MemoryStore) and open_store("memory://shared-test") is a and a.url == "memory://shared-test"
    assert open_store("memory://other-test") is not a
    assert isinstance(open_store(redis_url), RedisStore)


def test_memory_next_units_waits_for_units_like_a_blocking_read():
    store = MemoryStore()
    store.create_run(manifest(), {B0: []})
    t0 = time.monotonic()
    assert store.next_units("r1", B0, "a", block_ms=100) == []
    assert time.monotonic() - t0 >= 0.09
    assert store.next_units("r1", B0, "a", block_ms=None) == []


def test_a_job_without_units_has_an_empty_queue(store):
    store.create_run(manifest(), {B0: []})
    assert store.queue_counts("r1", B0) == {"entries": 0, "pending": 0}
    assert store.claim_pending("r1", B0, "a") == [] and store.next_units("r1", B0, "a", block_ms=None) == []
