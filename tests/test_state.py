"""Run state against a real redis-server: manifest, streams, consumer groups, leases, reclaiming."""

from __future__ import annotations

import pytest

from dblocks.units import Shard, make_units
from worker.state import RunState, StateError


def _run(state: RunState, run="r1", n=5) -> list:
    units = make_units(n * 10, 10, [Shard("s", 100)], seed=0, block=0)
    state.create_run({"run_id": run, "jobs": {"blocks/0": {}}}, {"blocks/0": units})
    return units


def test_manifest_and_units_are_written_once(redis_url):
    state = RunState(redis_url)
    units = _run(state)
    assert state.manifest("r1")["run_id"] == "r1"
    assert state.queue_counts("r1", "blocks/0") == {"entries": len(units), "pending": 0}
    assert state.progress("r1", "blocks/0")["units_total"] == str(len(units))
    with pytest.raises(StateError, match="run r1 already exists .* pass resume=r1"):
        _run(state)
    assert state.queue_counts("r1", "blocks/0")["entries"] == len(units)  # nothing enqueued twice


def test_unknown_run_and_unreachable_redis_fail_in_one_line(redis_url):
    state = RunState(redis_url)
    _run(state)
    with pytest.raises(StateError, match=r"run=nope: no such run in Redis at .* \(known: r1\)"):
        state.manifest("nope")
    with pytest.raises(StateError, match=r"redis.url=redis://127.0.0.1:1/0: cannot reach Redis"):
        RunState("redis://127.0.0.1:1/0")


def test_a_dead_consumers_unacknowledged_units_go_to_the_next_owner_in_order(redis_url):
    state = RunState(redis_url)
    units = _run(state)
    state.acquire("r1", "blocks/0", "a", ttl=0.2)
    got = state.next_units("r1", "blocks/0", "a", count=3)
    assert [u.seq for _, u in got] == [0, 1, 2]
    state.ack("r1", "blocks/0", [got[0][0]])  # a checkpoint covered unit 0 only; then "a" dies
    with pytest.raises(StateError, match="owned by worker 'a'"):
        state.acquire("r1", "blocks/0", "b", ttl=5)
    import time

    time.sleep(0.3)  # a's lease lapses
    state.acquire("r1", "blocks/0", "b", ttl=5)
    pending = state.claim_pending("r1", "blocks/0", "b")
    assert [u.seq for _, u in pending] == [1, 2]
    assert [u.seq for _, u in state.next_units("r1", "blocks/0", "b", count=10)] == [3, 4]
    assert state.next_units("r1", "blocks/0", "b", block_ms=50) == []
    state.ack("r1", "blocks/0", [i for i, _ in pending])
    assert state.queue_counts("r1", "blocks/0") == {"entries": len(units), "pending": 2}


def test_progress_metrics_and_lease_renewal(redis_url):
    state = RunState(redis_url)
    _run(state)
    state.acquire("r1", "blocks/0", "a", ttl=0.3)
    state.report("r1", "blocks/0", "a", 5, state="training", units_done=2)
    import time

    time.sleep(0.4)  # renewed to 5 s by the report: still a's
    with pytest.raises(StateError, match="owned by worker 'a'"):
        state.acquire("r1", "blocks/0", "b", ttl=5)
    assert state.progress("r1", "blocks/0")["state"] == "training"
    for k in range(3):
        state.log_metrics("r1", "blocks/0", {"step": k})
    last, first = state.read_metrics("r1", "blocks/0")
    assert [m["step"] for m in first] == [0, 1, 2]
    state.log_metrics("r1", "blocks/0", {"step": 3})
    assert [m["step"] for m in state.read_metrics("r1", "blocks/0", last)[1]] == [3]
    state.release("r1", "blocks/0", "a")
    state.acquire("r1", "blocks/0", "b", ttl=5)
