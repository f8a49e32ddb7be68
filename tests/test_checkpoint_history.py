"""Checkpoint history (``train.keep_checkpoints``) and the partial end of a run.

A block keeps its last K checkpoints, each with a content hash; a worker that finds the newest one
corrupt names it in one line, falls back to the previous good one and re-applies the units after it
(read again from the stream, where acknowledged units stay), so the block ends bit-identical to an
undisturbed one. With no usable checkpoint it starts over from unit 0, the same way. A block that
fails deterministically ends the run "partial": the other block is registered, the run says which
block failed, why, and how to continue it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid

import pytest
import torch

from coordinator.data import PrepareConfig, prepare
from dblocks.checkpoint import load_checkpoint, save_checkpoint
from dblocks.config import ConfigError
from dblocks.units import Shard, make_units
from helpers import mlflow_client
from worker.block_worker import BlockWorker, Checkpoints, checkpoint_rel, content_hash, export_rel, history_rel
from worker.config import load_run_config
from worker.record import JobId
from worker.storage import Storage
from worker.store import MemoryStore

B0, B1 = JobId("blocks", 0), JobId("blocks", 1)
# 4 units of 10 steps, a checkpoint after each: steps 10, 20, 30, 40
TRAIN = {"steps": 40, "unit_steps": 10, "checkpoint_every": 10, "batch_size": 16, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """The built-in digits, prepared once for every run of this module."""
    out = str(tmp_path_factory.mktemp("data") / "digits")
    prepare(PrepareConfig(input="builtin:digits", output=out))
    return out


def config(digits: str, out, name: str = "t-ckpt", sections: dict | None = None, **train):
    """The debug DiT, B=2, no baseline, on ``digits``: TRAIN with ``train`` overrides, plus ``sections``."""
    return load_run_config(
        {
            "name": name,
            "output_dir": str(out),
            "baseline": False,
            "blocks": {"num": 2},
            "model": {"size": "debug"},
            "data": {"path": digits},
            "train": {**TRAIN, **train},
            **(sections or {}),
        }
    )


class CrashingStore(MemoryStore):
    """The worker dies (raises) once it has applied ``after`` units: each one checkpointed and
    acknowledged (a checkpoint after every unit)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def incr(self, run, job, field, by=1):
        n = super().incr(run, job, field, by)
        if field == "units_applied" and n == self.after:
            raise RuntimeError("worker killed")
        return n


def new_block_run(digits: str, out, store: MemoryStore, **train) -> tuple[Storage, str]:
    from coordinator.run import new_run, open_data
    from coordinator.tracking import NullTracker

    storage = Storage(str(out / "storage"))
    cfg, data = open_data(config(digits, out, **train), storage)
    return storage, new_run(cfg, store, NullTracker(), storage, data).run_id


def finished(storage: Storage, run: str, out) -> tuple[dict, dict, dict]:
    """Block 1's exported EMA weights and its newest checkpoint (tensors, metadata)."""
    export, _ = load_checkpoint(storage.get_file(export_rel(run, B1), out / "export"))
    ckpt, meta = load_checkpoint(storage.get_file(checkpoint_rel(run, B1), out / "ckpt"))
    return export, ckpt, meta


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """Block 1 trained undisturbed (keeping 3 checkpoints): its storage, run id and final tensors."""
    out = tmp_path_factory.mktemp("reference")
    store = MemoryStore()
    storage, run = new_block_run(digits, out, store, keep_checkpoints=3)
    BlockWorker(store, run, B1, consumer="w0").run()
    return storage, run, finished(storage, run, out), store


def test_keep_checkpoints_is_at_least_two():
    with pytest.raises(ConfigError) as e:
        load_run_config({"train": {"keep_checkpoints": 1}})
    assert str(e.value) == "train.keep_checkpoints=1: must be >= 2 (to fall back from a corrupt checkpoint)"


def test_the_last_k_checkpoints_are_kept_each_with_its_content_hash(reference, tmp_path):
    """4 checkpoints written, 3 kept: the newest at checkpoint_rel, the others by step; every one's
    metadata holds the sha256 of its content. A unit's own Checkpoints keeps exactly K as well."""
    storage, run, _, _ = reference
    ckpts = Checkpoints(storage, run, B1, keep=3)
    assert ckpts.paths() == [checkpoint_rel(run, B1), history_rel(run, B1, 30), history_rel(run, B1, 20)]
    steps = []
    for i, rel in enumerate(ckpts.paths()):
        tensors, meta = load_checkpoint(storage.get_file(rel, tmp_path / f"c{i}"))
        assert meta["content_hash"].startswith("sha256:") and meta["content_hash"] == content_hash(tensors, meta)
        steps.append(meta["step"])
    assert steps == [40, 30, 20]

    own = Checkpoints(Storage(str(tmp_path / "s")), "r", B0, keep=2)
    for step in range(1, 6):
        own.save({"w": torch.full((3,), float(step))}, {"step": step})
        assert len(own.paths()) == min(step, 2)
    newest, older = own.load()[1], own.older()
    assert newest["step"] == 5 and [s for s, _ in older] == [4]


def test_a_worker_that_takes_turns_stops_at_each_checkpoint_and_ends_bit_identical(digits, reference, tmp_path):
    """``turn_units=1``: each run() applies one unit, checkpoints and acknowledges it, says "queued" and
    returns None; the next one resumes there. Four turns apply each unit once and end with the
    weights of the undisturbed run."""
    store = MemoryStore()
    storage, run = new_block_run(digits, tmp_path, store, keep_checkpoints=3)
    turns = []
    while (result := BlockWorker(store, run, B1, consumer="w0", turn_units=1).run()) is None:
        p = store.progress(run, B1)
        turns.append((p["state"], p["units_done"]))
    assert turns == [("queued", "1"), ("queued", "2"), ("queued", "3")] and result["units"] == 4
    assert store.progress(run, B1)["units_applied"] == "4"
    export, ckpt, _ = finished(storage, run, tmp_path)
    _, _, (ref_export, ref_ckpt, _), _ = reference
    assert same(export, ref_export) and same(ckpt, ref_ckpt)


def test_inline_workers_give_the_blocks_turns(digits, tmp_path):
    """Two blocks in one process advance together, one unit each per poll, as on a cluster; a job
    left alone runs to its end in one poll."""
    from coordinator.workers import InlineWorkers

    store = MemoryStore()
    _, run = new_block_run(digits, tmp_path, store)
    workers = InlineWorkers()
    workers.attach(store, run)
    workers.start(B0)
    workers.start(B1)
    seen, finished_jobs = [], []
    while workers.queue:
        finished_jobs += [job for job, result, error in workers.poll(0) if error is None]
        seen.append(tuple(int(store.progress(run, j)["units_done"]) for j in (B0, B1)))
    assert seen == [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (4, 3), (4, 4)]
    assert finished_jobs == [B0, B1]


def truncate(storage: Storage, rel: str) -> None:
    path = storage.path(rel)
    with open(path, "rb+") as f:
        f.truncate(len(f.read()) // 2)


def flip_last_byte(storage: Storage, rel: str) -> None:
    path = storage.path(rel)
    with open(path, "rb+") as f:
        data = bytearray(f.read())
        data[-1] ^= 0xFF
        f.seek(0)
        f.write(data)


@pytest.mark.parametrize(
    "damage, says",
    [
        (truncate, "unreadable (Error while deserializing header"),
        (flip_last_byte, "its content does not match its recorded hash sha256:"),
    ],
)
def test_a_corrupt_newest_checkpoint_falls_back_and_the_block_ends_bit_identical(
    damage, says, digits, reference, tmp_path, caplog
):
    """The worker dies after units 0-2 are acknowledged (checkpoints at steps 20 and 30 kept); the
    newest is damaged. The next worker names it in one line, loads step 20, re-applies unit 2 (read
    again from the stream) and unit 3, and ends with the weights of the undisturbed run."""
    store = CrashingStore(after=3)
    storage, run = new_block_run(digits, tmp_path, store)
    with pytest.raises(RuntimeError, match="worker killed"):
        BlockWorker(store, run, B1, consumer="w0").run()
    assert Checkpoints(storage, run, B1, keep=2).paths() == [checkpoint_rel(run, B1), history_rel(run, B1, 20)]
    damage(storage, checkpoint_rel(run, B1))
    with caplog.at_level(logging.INFO, logger="worker.block_worker"):
        BlockWorker(store, run, B1, consumer="w1").run()
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert skipped[0].startswith(f"blocks/1: skipping checkpoint {storage.uri(checkpoint_rel(run, B1))}: {says}")
    assert "blocks/1: resumed after unit 1 (step 20)" in caplog.text
    assert "blocks/1: re-applying units 2..2" in caplog.text
    p = store.progress(run, B1)
    assert p["state"] == "done" and p["units_applied"] == "5"  # units 0-2, then 2 again and 3
    assert store.queue_counts(run, B1) == {"entries": 4, "pending": 0}
    export, ckpt, meta = finished(storage, run, tmp_path)
    _, _, (ref_export, ref_ckpt, ref_meta), _ = reference
    assert same(export, ref_export) and same(ckpt, ref_ckpt)  # EMA, weights, optimizer state, generator
    assert meta["units"] == [0, 1, 2, 3] and meta["content_hash"] == ref_meta["content_hash"]
    assert Checkpoints(storage, run, B1, keep=2).paths() == [checkpoint_rel(run, B1), history_rel(run, B1, 30)]


def test_with_no_usable_checkpoint_the_block_starts_over_from_unit_0(digits, reference, tmp_path, caplog):
    """Every kept checkpoint damaged: each is named, then one line names them all and says the block
    re-applies its units from unit 0 (all of them are still in the stream); it ends bit-identical."""
    store = CrashingStore(after=3)
    storage, run = new_block_run(digits, tmp_path, store)
    with pytest.raises(RuntimeError, match="worker killed"):
        BlockWorker(store, run, B1, consumer="w0").run()
    kept = Checkpoints(storage, run, B1, keep=2).paths()
    for rel in kept:
        truncate(storage, rel)
    with caplog.at_level(logging.INFO, logger="worker.block_worker"):
        BlockWorker(store, run, B1, consumer="w1").run()
    uris = ", ".join(storage.uri(rel) for rel in kept)
    said = [r.getMessage() for r in caplog.records if "no usable checkpoint" in r.getMessage()]
    assert said == [f"blocks/1: no usable checkpoint ({uris}); re-applying its units from unit 0"]
    assert "blocks/1: re-applying units 0..2" in caplog.text
    assert store.progress(run, B1)["units_applied"] == "7"  # units 0-2, then all 4 again
    export, ckpt, _ = finished(storage, run, tmp_path)
    _, _, (ref_export, ref_ckpt, _), _ = reference
    assert same(export, ref_export) and same(ckpt, ref_ckpt)


def test_units_from_reads_acknowledged_units_again(store):
    """Every unit from a seq on, whatever its state: acknowledged, pending or never delivered
    (``store``: a MemoryStore, then a RedisStore on a real redis-server)."""
    from dblocks.plan import BlockSpec
    from worker.record import Job, Manifest

    job, shards = B0, [Shard("s", 100)]
    spec = BlockSpec(0, 1, 0.002, 80.0, 0.002, 80.0, layer_start=0, layer_end=2)
    jobs = {job: Job(job, spec, "plan", 5, "t-block0", "mlrun-0")}
    units = make_units(50, 10, shards, seed=0, block=0)
    store.create_run(Manifest("r1", "t", 1.5, {}, "/storage", shards, jobs, "sqlite:///x.db", "parent"), {job: units})
    delivered = store.next_units("r1", job, "a", count=3, block_ms=None)
    store.ack("r1", job, [i for i, _ in delivered[:2]])  # 0, 1 acknowledged; 2 pending; 3, 4 new
    again = store.units_from("r1", job, 1)
    assert [u for _, u in again] == units[1:] and [i for i, _ in again[:2]] == [i for i, _ in delivered[1:]]
    assert store.units_from("r1", job, 5) == []


def test_a_block_that_fails_deterministically_ends_the_run_partial(digits, tmp_path, caplog):
    """Block 1 finds a checkpoint of another plan (deterministic: not restarted). Block 0 finishes
    and is registered; block 1's MLflow run and the parent end FAILED; metrics.json and last_run say
    "partial"; the error is one line with the resume command. Moving the file away and resuming
    finishes the run."""

    from coordinator.errors import USER_ERRORS
    from coordinator.policy import RunPartial
    from coordinator.run import artifact_location, default_tracking_uri, new_run, open_data, run
    from coordinator.tracking import MlflowTracker
    from worker.store import memory_store

    out = tmp_path / "out"
    sections = {
        "redis": {"url": f"memory://partial-{uuid.uuid4().hex[:6]}"},
        "workers": {"backend": "inline"},
        "sample": {"steps": 5, "per_class": 2},
        "registry": {"champion_threshold": 0},
    }
    cfg = config(digits, out, "t-partial", sections, steps=10)
    uri = default_tracking_uri(cfg)
    storage, store = Storage(str(out / "storage")), memory_store(cfg.redis.url)
    opened, data = open_data(cfg, storage)
    tracker = MlflowTracker(uri, cfg.name, artifact_location(uri))
    manifest = new_run(opened, store, tracker, storage, data)
    tracker.end(manifest.parent_run, ok=False)  # as a coordinator that stopped; run(resume) reopens it
    run_id = manifest.run_id
    bad = checkpoint_rel(run_id, B1)  # a file of another plan where block 1's checkpoint goes
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"plan_hash": "other", "step": 10})
    storage.put_file(tmp_path / "other.safetensors", bad)

    resume = dataclasses.replace(cfg, resume=run_id)
    with pytest.raises(RunPartial) as e:
        run(resume)
    message = str(e.value)
    assert isinstance(e.value, USER_ERRORS) and "\n" not in message
    assert message.startswith(f"run {run_id} ended partial: blocks/1 failed (CheckpointError: {storage.uri(bad)}")
    assert "was written by plan other" in message
    assert message.endswith(f"fix it and continue with: python -m coordinator resume={run_id} <the run's overrides>")
    assert "restarts" not in store.progress(run_id, B1)  # deterministic: never restarted
    assert store.progress(run_id, B0)["state"] == "done" and store.progress(run_id, B1)["state"] == "failed"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "partial" and list(metrics["registered"]) == ["blocks/0"]
    assert list(metrics["failed"]) == ["blocks/1"] and "was written by plan other" in metrics["failed"]["blocks/1"]
    last = (out / "last_run").read_text().splitlines()
    assert last[0] == run_id and last[2].startswith("partial: blocks/1 failed (CheckpointError: ")

    client = mlflow_client(uri)
    assert client.get_model_version_by_alias("t-partial-block0", "candidate").tags["run_id"] == run_id
    assert client.search_model_versions("name='t-partial-block1'") == []
    status = {j: client.get_run(manifest.job(j).mlflow_run).info.status for j in (B0, B1)}
    assert status == {B0: "FINISHED", B1: "FAILED"}
    assert client.get_run(manifest.parent_run).info.status == "FAILED"

    storage.delete(bad)  # fix it, and continue as the message says
    run(resume)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and list(metrics["registered"]) == ["blocks/0", "blocks/1"]
    assert client.get_run(manifest.job(B1).mlflow_run).info.status == "FINISHED"
    assert client.get_run(manifest.parent_run).info.status == "FINISHED"
    assert (out / "last_run").read_text().splitlines() == last[:2]


class OneFailsAtOnce:
    """Block 1's worker raises a DataError at its first poll; block 0's finishes at its third."""

    def __init__(self, store: MemoryStore, run: str):
        self.store, self.run, self.polls, self.active = store, run, 0, set()

    def attach(self, store, run_id) -> None:
        pass

    def start(self, job: JobId) -> None:
        self.active.add(job)

    def stop(self, job: JobId) -> None:
        self.active.discard(job)

    def running(self) -> set[JobId]:
        return set(self.active)

    def unschedulable(self, job: JobId) -> None:
        return None

    def poll(self, timeout: float) -> list:
        from dblocks.datacard import DataError

        self.polls += 1
        out = []
        if self.polls == 1:
            self.active.discard(B1)
            out.append((B1, None, DataError("s3://bucket/shard-00003.parquet row 7: label is null")))
        if self.polls == 3:
            self.active.discard(B0)
            self.store.report(self.run, B0, state="done")
            out.append((B0, {"job": str(B0)}, None))
        return out


def test_a_block_that_fails_for_good_lets_the_others_finish():
    """The controller gives up on block 1 at once (bad data: a restart would read the same row) and
    keeps stepping block 0 to its end; then ``BlocksFailed`` names block 1, with block 0 done."""
    from coordinator.controller import Controller
    from coordinator.policy import BlocksFailed, FailurePolicy
    from coordinator.tracking import NullTracker
    from dblocks.plan import BlockSpec
    from worker.record import Job, Manifest

    store = MemoryStore()
    jobs = {
        j: Job(j, BlockSpec(j.index, 2, 0.1, 1.0, 0.1, 1.0, layer_start=j.index, layer_end=j.index + 1), "p", 1, "", "")
        for j in (B0, B1)
    }
    manifest = Manifest("r", "t", 0.0, {}, "/nowhere", [], jobs, NullTracker.uri, "parent")
    store.create_run(manifest, {j: [] for j in jobs})
    workers = OneFailsAtOnce(store, "r")
    c = Controller(manifest, store, workers, NullTracker(), FailurePolicy(2, 30.0), list(jobs))
    c.start()
    assert not c.step(timeout=0) and set(c.failed) == {B1} and workers.running() == {B0}
    assert store.progress("r", B1)["state"] == "failed"
    assert not c.step(timeout=0)
    with pytest.raises(BlocksFailed) as e:
        c.step(timeout=0)
    assert e.value.done == {B0} and list(e.value.failures) == [B1]
    why = "DataError: s3://bucket/shard-00003.parquet row 7: label is null"
    assert str(e.value) == f"blocks/1 failed, not restarted (it would fail the same way): {why}"
    assert e.value.failures[B1].reason == why and workers.polls == 3


def test_a_shard_that_fails_its_check_is_deterministic_and_named(digits, tmp_path):
    """A shard that changed after the run started fails the block's worker with a DataError naming
    the shard: the policy fails the block at once (a restart would read the same file)."""
    import shutil

    from coordinator.policy import Decision, FailurePolicy
    from dblocks.datacard import DataError

    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    store = MemoryStore()
    _, run = new_block_run(str(data), tmp_path, store)
    shards = store.manifest(run).shards
    for shard in shards:
        (data / shard.path).write_bytes(b"not parquet")
    with pytest.raises(DataError) as e:
        BlockWorker(store, run, B1, consumer="w0").run()
    assert any(str(e.value).startswith(f"{data / s.path}: ") for s in shards)  # names the shard
    policy = FailurePolicy(max_restarts=2, lease_seconds=30.0)
    assert policy.decide(B1, e.value) is Decision.FAIL and policy.restarts[B1] == 0
    failure = policy.failure(B1, e.value)
    assert str(failure).startswith("blocks/1 failed, not restarted (it would fail the same way): DataError: ")
    assert "not a readable parquet file" in failure.reason and "\n" not in str(failure)
