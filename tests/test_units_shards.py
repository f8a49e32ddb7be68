"""Work units (pure): counts, seeds, determinism; storage; a worker killed mid-block resumes bit-exactly."""

from __future__ import annotations

import pytest
import torch

from dblocks.build import make_trainer, model_plans
from dblocks.data import load_digits_split
from dblocks.units import Shard, apply_unit, make_units, unit_batches
from worker.config import load_run_config
from worker.record import JobId
from worker.storage import Storage, StorageError
from worker.store import MemoryStore


def test_units_cover_exactly_the_steps_and_cycle_over_every_shard():
    shards = [Shard("a", 100), Shard("b", 90)]
    units = make_units(1500, 50, shards, seed=0, block=1)
    assert len(units) == 30 and sum(u.steps for u in units) == 1500
    assert [u.seq for u in units] == list(range(30))
    assert [u.shard for u in units[:4]] == ["a", "b", "a", "b"]
    assert [u.epoch for u in units[:4]] == [0, 0, 1, 1]
    assert (units[1].row_start, units[1].row_end) == (0, 90)
    last = make_units(120, 50, shards, seed=0, block=1)
    assert [u.steps for u in last] == [50, 50, 20]


def test_unit_seeds_differ_across_units_blocks_and_run_seeds_and_are_stable():
    shards = [Shard("a", 100)]
    a = make_units(500, 50, shards, seed=0, block=0)
    assert len({u.seed for u in a}) == len(a)
    assert not {u.seed for u in a} & {u.seed for u in make_units(500, 50, shards, seed=0, block=1)}
    assert not {u.seed for u in a} & {u.seed for u in make_units(500, 50, shards, seed=1, block=0)}
    assert a == make_units(500, 50, shards, seed=0, block=0)


def test_unit_batches_are_permutations_of_the_range_without_repeats_within_a_pass():
    (u,) = make_units(7, 7, [Shard("a", 35)], seed=3, block=0)
    batches = unit_batches(u, 8)  # 4 batches per pass of 35 rows (3 rows dropped), then a new pass
    assert len(batches) == 7 and all(len(b) == 8 for b in batches)
    first_pass = torch.cat(batches[:4])
    assert len(set(first_pass.tolist())) == 32 and first_pass.max() < 35
    assert all(torch.equal(x, y) for x, y in zip(batches, unit_batches(u, 8)))
    with pytest.raises(ValueError, match="larger than the 35 rows of shard a"):
        unit_batches(u, 64)


def _trainer(cfg, spec):
    return make_trainer(cfg, spec)


def test_applying_a_unit_depends_only_on_the_state_before_it_and_the_unit():
    """What makes re-application after a crash exact: same start state + same unit = same result,
    whatever the trainer's generator did before."""
    cfg = load_run_config(
        {"model": {"size": "debug"}, "blocks": {"num": 2}, "train": {"batch_size": 16, "device": "cpu"}}
    )
    spec = model_plans(cfg)["blocks"][1]
    data = load_digits_split()
    units = make_units(6, 3, [Shard("s", 200)], seed=0, block=1)
    x, y = data.train_x[:200], data.train_y[:200]
    a, b = _trainer(cfg, spec), _trainer(cfg, spec)
    apply_unit(a, units[0], (x, y))
    apply_unit(b, units[0], (x, y))
    torch.randn(5, generator=b.generator)  # disturb b's generator between units
    apply_unit(a, units[1], (x, y))
    apply_unit(b, units[1], (x, y))
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)
    c = _trainer(cfg, spec)
    apply_unit(c, units[1], (x, y))  # a different history gives different weights: the test can fail
    assert not all(torch.equal(p, q) for p, q in zip(a.net.parameters(), c.net.parameters()))


@pytest.fixture
def digits():
    return load_digits_split()


def test_storage_takes_file_uris_like_paths(tmp_path):
    st = Storage(tmp_path.as_uri())
    st.write_bytes("a/b.bin", b"xyz")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"xyz" and st.read_bytes("a/b.bin") == b"xyz"
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(StorageError, match="does not exist"):
        st.read_bytes("missing")


@pytest.mark.parametrize("root", ["nosuchscheme://bucket/run", "file://"])
def test_a_bad_storage_uri_is_one_line_naming_it(root):
    with pytest.raises(StorageError, match=rf"storage.path={root!r}: ") as e:
        Storage(root)
    assert "\n" not in str(e.value)


class CrashingStore(MemoryStore):
    """A MemoryStore that kills its worker once: right after its ``applied``-th unit application
    (the worker counts each in ``units_applied``), or at its first ``ack``."""

    def __init__(self, applied: int | None = None, ack: bool = False):
        super().__init__()
        self.applied, self.crash_on_ack = applied, ack

    def incr(self, run, job, field, by=1):
        n = super().incr(run, job, field, by)
        if field == "units_applied" and n == self.applied:
            self.applied = None
            raise RuntimeError("worker killed")
        return n

    def ack(self, run, job, ids):
        if self.crash_on_ack:
            self.crash_on_ack = False
            raise RuntimeError("worker killed")
        super().ack(run, job, ids)


def _train_block(tmp_path, store: MemoryStore) -> tuple[dict, dict, dict]:
    """Block 1 of a 2-block debug DiT run (4 units of 10 steps, a checkpoint every 20 steps) trained
    by BlockWorkers on ``store``, a fresh worker after each crash; (export, checkpoint, progress)."""
    from coordinator.run import new_run, open_data
    from coordinator.tracking import NullTracker
    from dblocks.checkpoint import load_checkpoint
    from worker.block_worker import BlockWorker, checkpoint_rel, export_rel

    train = {"steps": 40, "unit_steps": 10, "checkpoint_every": 20, "batch_size": 16, "threads": 1, "device": "cpu"}
    cfg = load_run_config(
        {
            "output_dir": str(tmp_path),
            "baseline": False,
            "blocks": {"num": 2},
            "model": {"size": "debug"},
            "train": train,
        }
    )
    storage = Storage(str(tmp_path / "storage"))
    cfg, data = open_data(cfg, storage)
    run = new_run(cfg, store, NullTracker(), storage, data).run_id
    job = JobId("blocks", 1)
    for attempt in range(3):
        try:
            BlockWorker(store, run, job, consumer=f"w{attempt}").run()
            break
        except RuntimeError as e:
            assert str(e) == "worker killed" and store.progress(run, job)["state"] == "failed"
    export = load_checkpoint(storage.get_file(export_rel(run, job), tmp_path / "export"))
    ckpt = load_checkpoint(storage.get_file(checkpoint_rel(run, job), tmp_path / "ckpt"))
    return export, ckpt, store.progress(run, job)


@pytest.mark.parametrize("crash", [{"applied": 3}, {"ack": True}], ids=["unit-2-applied", "before-first-ack"])
def test_a_worker_killed_mid_block_resumes_bit_exactly(tmp_path, crash):
    """Killed with unit 2 applied past its checkpoint (unit 2 is applied again), or between the
    checkpoint and its ack (units 0, 1 are skipped): the next worker's block equals an
    uninterrupted one's, weights, optimizer state and generator included."""
    (straight, meta), (ckpt, ckpt_meta), p = _train_block(tmp_path / "straight", MemoryStore())
    assert p["units_applied"] == "4" and p["consumer"] == "w0" and ckpt_meta["units"] == [0, 1, 2, 3]
    (resumed, rmeta), (rckpt, rckpt_meta), rp = _train_block(tmp_path / "crash", CrashingStore(**crash))
    assert rp["state"] == "done" and rp["consumer"] == "w1"
    # units_applied counts after the ack: unit 2 twice (5), or unit 1's count lost with the ack (3)
    assert rp["units_applied"] == ("5" if "applied" in crash else "3")
    assert rmeta == meta and meta["plan_hash"] and rckpt_meta == ckpt_meta
    for ours, theirs in ((resumed, straight), (rckpt, ckpt)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


class CountingStore(MemoryStore):
    """Counts the bare heartbeats (reports without fields) a worker sends from inside its units."""

    beats = 0

    def report(self, run, job, owner=None, ttl=None, **fields):
        self.beats += not fields
        super().report(run, job, owner, ttl, **fields)


def test_a_worker_heartbeats_between_steps_when_a_unit_outlasts_a_third_of_its_lease(tmp_path):
    from coordinator.run import new_run, open_data
    from coordinator.tracking import NullTracker
    from worker.block_worker import BlockWorker

    train = {"steps": 20, "unit_steps": 20, "batch_size": 16, "threads": 1, "device": "cpu"}
    d = {"output_dir": str(tmp_path), "baseline": False, "blocks": {"num": 2}, "model": {"size": "debug"}}
    slow, quick = CountingStore(), CountingStore()
    for store, lease in ((slow, 3e-4), (quick, 600.0)):  # a third of the lease: shorter / longer than a step
        cfg = load_run_config({**d, "train": train, "workers": {"lease_seconds": lease}})
        storage = Storage(str(tmp_path / "storage"))
        cfg, data = open_data(cfg, storage)
        run = new_run(cfg, store, NullTracker(), storage, data).run_id
        BlockWorker(store, run, JobId("blocks", 0), consumer="w").run()
        assert store.progress(run, JobId("blocks", 0))["state"] == "done"
    assert slow.beats >= 10 and quick.beats == 0
