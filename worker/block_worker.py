"""One block's training process: the same class runs as a Ray actor, inline, or as ``python -m worker``.

``BlockWorker(store, run_id, job, consumer).run()``:
1. reads the run's Manifest from the store and builds its block (only this block: ~1/B of the model)
   on the device of the machine it runs on,
2. takes the block's lease, loads its newest checkpoint that reads and matches its content hash
   (``Checkpoints``: a corrupt one is named in a warning and the previous one is taken; with none,
   the block starts from scratch) and re-reads from the stream the units acknowledged after it,
3. claims units left pending by a dead predecessor, then consumes new ones, applying each unit
   exactly once in sequence order (a unit the checkpoint already covers is acknowledged and
   skipped; a gap in the sequence is an error, never silently skipped); it takes one unit ahead,
   whose rows the prefetch thread (worker/prefetch.py) reads from the dataset (``data.path``) while
   the current one trains, so it holds at most two units' rows whatever the dataset's size,
4. checkpoints atomically every ``train.checkpoint_every`` steps (at unit boundaries), keeping the
   last ``train.keep_checkpoints``, and only then acknowledges the units the checkpoint covers,
5. reports progress (a heartbeat at least every ``workers.lease_seconds / 3``, from between
   training steps too) and per-unit metrics to the store, and finally exports the EMA weights.
With ``turn_units=N`` it returns ``None`` after N units, at the first point a checkpoint covers
them all (state "queued"): inline workers take turns this way, so the blocks of one process
advance together, as on a cluster (previews from the middle of training, a bar per block moving).
Ray is applied from outside (``ray.remote(BlockWorker)`` in coordinator/workers.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError

from dblocks.build import make_trainer
from dblocks.checkpoint import load_checkpoint, save_checkpoint
from dblocks.config import RunConfig, resolve_device
from dblocks.errors import one_line
from dblocks.families.base import effective_batch
from dblocks.trainer import BlockTrainer
from dblocks.units import WorkUnit, apply_unit

from .config import load_run_config
from .dataset import open_dataset
from .prefetch import RowPrefetcher
from .record import Job, JobId, Manifest
from .storage import CheckpointError, Storage
from .store import RunStore, StoreError, open_run_store

log = logging.getLogger(__name__)

SIGMA_BUCKETS = 4  # loss per level bucket over the block's training range (the levels' bucket_edges)


def job_dir(run_id: str, job: JobId | str) -> str:
    return f"runs/{run_id}/{job}"


def checkpoint_rel(run_id: str, job: JobId | str) -> str:
    """The block's newest checkpoint (where a previous version kept its only one)."""
    return f"{job_dir(run_id, job)}/checkpoint.safetensors"


def history_rel(run_id: str, job: JobId | str, step: int) -> str:
    """An older checkpoint of the block, kept to fall back to, by its step."""
    return f"{job_dir(run_id, job)}/checkpoint-{step:09d}.safetensors"


_HISTORY = re.compile(r"/checkpoint-(\d+)\.safetensors$")


def export_rel(run_id: str, job: JobId | str) -> str:
    """The finished block: EMA weights only, plus what is needed to rebuild it (metadata)."""
    return f"{job_dir(run_id, job)}/block.safetensors"


def preview_rel(run_id: str, job: JobId | str) -> str:
    """The block's EMA weights of its latest preview point (``eval.every``), in the export format."""
    return f"{job_dir(run_id, job)}/preview.safetensors"


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bucket_name(space: str, lo: float, hi: float) -> str:
    """A bucket's metric, named by its range so a chart reads without the code: ``loss_sigma/0.3-1.2``."""
    return f"loss_{space}/{lo:.3g}-{hi:.3g}"


def bucket_losses(level: torch.Tensor, losses: torch.Tensor, edges: torch.Tensor, space: str = "sigma") -> dict:
    """Mean loss in each bucket between consecutive ``edges`` (empty buckets are left out)."""
    idx = torch.bucketize(level.double(), edges[1:-1])
    return {
        bucket_name(space, edges[k].item(), edges[k + 1].item()): losses[idx == k].mean().item()
        for k in range(len(edges) - 1)
        if (idx == k).any()
    }


def unit_memory(device: torch.device) -> dict[str, float]:
    """Memory of the unit just trained: the process RSS, and on CUDA the peak bytes allocated and
    reserved by torch since the previous call (``torch.cuda.max_memory_allocated``), in MiB."""
    out = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return out


def content_hash(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """sha256 of a checkpoint's content: each tensor's name, dtype, shape and bytes (in name order),
    then its metadata as JSON (without this hash)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "content_hash"}, sort_keys=True).encode())
    return f"sha256:{h.hexdigest()}"


def read_checkpoint(storage: Storage, rel: str, tmp: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint that reads and matches its recorded content hash (one written before hashes were
    recorded is taken as it reads), else a CheckpointError naming it. A storage error (the file cannot
    be fetched) is not a corrupt checkpoint: it propagates and the worker's restart tries again."""
    local = storage.get_file(rel, Path(tmp) / "ckpt.safetensors")
    try:
        tensors, meta = load_checkpoint(local)
    except (SafetensorError, ValueError) as e:  # truncated, a bad header, metadata that is not JSON
        raise CheckpointError(f"{storage.uri(rel)}: unreadable ({one_line(e)})") from None
    recorded = meta.get("content_hash")
    if recorded is not None and recorded != content_hash(tensors, meta):
        raise CheckpointError(f"{storage.uri(rel)}: its content does not match its recorded hash {recorded[:19]}...")
    return tensors, meta


class Checkpoints:
    """A block's last ``keep`` checkpoints in storage: the newest at ``checkpoint_rel``, older ones at
    ``history_rel``, each with its ``content_hash`` in its metadata. ``save`` keeps the newest as
    history, writes the new one (atomically), then deletes the oldest beyond ``keep``; ``load`` returns
    the newest that reads and matches its hash, naming each one it skips in a one-line warning."""

    def __init__(self, storage: Storage, run_id: str, job: JobId, keep: int):
        self.storage, self.run_id, self.job, self.keep = storage, run_id, job, keep
        self.newest_step: int | None = None  # the good checkpoint at checkpoint_rel (None: none, or unusable)
        self.loaded: str | None = None  # the checkpoint ``load`` returned

    def older(self) -> list[tuple[int, str]]:
        """(step, path) of the kept older checkpoints, newest first."""
        found = [(_HISTORY.search(rel), rel) for rel in self.storage.files(job_dir(self.run_id, self.job))]
        return sorted(((int(m.group(1)), rel) for m, rel in found if m), reverse=True)

    def paths(self) -> list[str]:
        """Every checkpoint of the block, newest first."""
        newest = checkpoint_rel(self.run_id, self.job)
        return ([newest] if self.storage.exists(newest) else []) + [rel for _, rel in self.older()]

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The newest usable checkpoint, or None (none written, or none usable: the block starts over)."""
        skipped = []
        with tempfile.TemporaryDirectory() as tmp:
            for rel in self.paths():
                try:
                    tensors, meta = read_checkpoint(self.storage, rel, tmp)
                except CheckpointError as e:
                    log.warning("%s: skipping checkpoint %s", self.job, e)
                    skipped.append(self.storage.uri(rel))
                    continue
                if rel == checkpoint_rel(self.run_id, self.job):
                    self.newest_step = meta["step"]
                self.loaded = rel
                return tensors, meta
        if skipped:
            log.warning(
                "%s: no usable checkpoint (%s); re-applying its units from unit 0", self.job, ", ".join(skipped)
            )
        return None

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write a new newest checkpoint (``meta["step"]``: its step), then prune to ``keep``."""
        meta = {**meta, "content_hash": content_hash(tensors, meta)}
        newest, step = checkpoint_rel(self.run_id, self.job), meta["step"]
        if self.newest_step is not None and self.storage.exists(newest):
            self.storage.move(newest, history_rel(self.run_id, self.job, self.newest_step))
        with tempfile.TemporaryDirectory() as tmp:
            self.storage.put_file(save_checkpoint(Path(tmp) / "ckpt.safetensors", tensors, meta), newest)
        self.newest_step = step
        older = self.older()  # those from beyond ``step`` are left from before a fallback: unusable
        kept = [rel for s, rel in older if s < step][: self.keep - 1]
        for _, rel in older:
            if rel not in kept:
                self.storage.delete(rel)


class Heartbeat:
    """Reports ``beat()`` to the store (renewing the lease) when ``every`` seconds have passed since
    the last report; cheap enough to call after every training step."""

    def __init__(self, store: RunStore, run: str, job: JobId, consumer: str, ttl: float):
        self.store, self.run, self.job, self.consumer, self.ttl = store, run, job, consumer, ttl
        self.every, self.last = ttl / 3, time.monotonic()

    def report(self, **fields) -> None:
        self.store.report(self.run, self.job, self.consumer, self.ttl, **fields)
        self.last = time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last >= self.every:
            self.report()


class _BeatingTrainer:
    """The trainer as ``apply_unit`` sees it, with a heartbeat after each step: a unit that takes
    longer than the lease never makes a healthy worker look hung."""

    def __init__(self, trainer: BlockTrainer, heartbeat: Heartbeat):
        self._trainer, self._heartbeat = trainer, heartbeat

    def __getattr__(self, name: str):
        return getattr(self._trainer, name)

    def step(self, batch: tuple) -> dict:
        out = self._trainer.step(batch)
        self._heartbeat.beat()
        return out


class BlockWorker:
    def __init__(self, store: RunStore | str, run_id: str, job: JobId | str, consumer: str, turn_units: int = 0):
        """``store``: a store object (in this process) or its URL (opened where the worker runs: a Ray actor).
        ``turn_units``: return ``None`` after this many units, once a checkpoint covers them (0: to the end)."""
        self.store, self.run_id, self.consumer, self.turn_units = store, run_id, consumer, turn_units
        self.job = job if isinstance(job, JobId) else JobId.parse(job)
        self.trainer: BlockTrainer | None = None
        self._reader: RowPrefetcher | None = None

    # Ray calls these as actor methods; nothing here knows about Ray.
    def pid(self) -> int:
        return os.getpid()

    def held_parameters(self) -> dict:
        """What this process holds: trainable parameters of every torch module it has built."""
        import gc

        # type(), not isinstance(): gc also returns weak proxies (torch.compile's), whose isinstance raises
        objs = gc.get_objects()
        params = {id(p): p for p in objs if issubclass(type(p), torch.nn.Parameter) and p.requires_grad}
        block = trainable_parameters(self.trainer.net) if self.trainer else 0
        return {"trainable": sum(p.numel() for p in params.values()), "block": block}

    def run(self) -> dict | None:
        store = open_run_store(self.store, self.run_id) if isinstance(self.store, str) else self.store
        manifest = store.manifest(self.run_id)
        try:
            info = manifest.job(self.job)
        except KeyError as e:
            raise StoreError(e.args[0]) from None
        try:
            return self._run(store, manifest, info)
        except BaseException as e:
            store.report(self.run_id, self.job, state="failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            if self._reader is not None:  # its thread may be reading the next unit's rows
                self._reader.close()
            store.release(self.run_id, self.job, self.consumer)

    def _run(self, store: RunStore, manifest: Manifest, info: Job) -> dict:
        run, job, spec, total = self.run_id, self.job, info.spec, info.units
        cfg = load_run_config(manifest.config)
        ttl = cfg.workers.lease_seconds
        turn = store.progress(run, job).get("state") == "queued"  # its next turn (inline), or a first start
        store.acquire(run, job, self.consumer, ttl)
        heartbeat = Heartbeat(store, run, job, self.consumer, ttl)
        heartbeat.report(state="starting", consumer=self.consumer)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        storage = Storage(manifest.storage)
        device = resolve_device(cfg.train.device)

        trainer = self.trainer = make_trainer(cfg, spec, baseline=job.baseline, device=device)
        net = trainer.net
        applied: list[int] = []
        checkpoints = Checkpoints(storage, run, job, cfg.train.keep_checkpoints)
        loaded = checkpoints.load()
        if loaded is not None:
            tensors, meta = loaded
            if meta.get("plan_hash") != info.plan_hash:  # another run's file: restarting would read it again
                raise CheckpointError(
                    f"{storage.uri(checkpoints.loaded)} was written by plan {meta.get('plan_hash')}, "
                    f"this run's is {info.plan_hash}; move it away or resume the run that wrote it"
                )
            trainer.load_state_dict(tensors, meta)
            applied = meta["units"]
            (log.debug if turn else log.info)(
                "%s: resumed after unit %d (step %d)", job, len(applied) - 1, trainer.step_count
            )

        def checkpoint() -> None:
            tensors, meta = trainer.state_dict()
            checkpoints.save(tensors, {**meta, "plan_hash": info.plan_hash, "units": applied})

        common = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            consumer=self.consumer,
            units_total=total,
            device=str(device),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            trainable_params=trainable_parameters(net),
            samples_total=cfg.train.steps * cfg.train.batch_size,
        )
        heartbeat.report(
            state="training", units_done=len(applied), samples=trainer.samples, started_at=time.time(), **common
        )
        beating = _BeatingTrainer(trainer, heartbeat)
        reader = RowPrefetcher(open_dataset(cfg.data.path), seq_len=cfg.seq_len, pin=device.type == "cuda")
        self._reader = reader
        edges = cfg.levels.bucket_edges(spec.train_lo, spec.train_hi, SIGMA_BUCKETS)
        unacked: list[str] = []
        last_ckpt_step = trainer.step_count
        queue = self._claim(store, len(applied), total)
        turn_ends = len(applied) + self.turn_units if self.turn_units else total
        while len(applied) < total:
            if len(queue) < 2:  # the unit to train and the next one, whose rows are read meanwhile
                block_ms = 1 if queue else max(1, int(min(ttl / 3, 2) * 1000))
                queue += store.next_units(run, job, self.consumer, count=2 - len(queue), block_ms=block_ms)
                if not queue:  # nothing new yet: stay alive
                    heartbeat.report(state="waiting")
                    continue
            msg_id, unit = queue.pop(0)
            if unit.seq < len(applied):  # the checkpoint covers it (we died between checkpoint and ack)
                store.ack(run, job, [msg_id])
                continue
            if unit.seq > len(applied):
                raise StoreError(f"{job}: unit {len(applied)} is missing from the queue (got unit {unit.seq})")
            t0 = time.perf_counter()
            rows = reader.rows(unit)
            if queue:
                reader.prefetch(queue[0][1])
            metrics = self._apply(beating, unit, rows, edges, cfg.levels.space)
            dt = time.perf_counter() - t0
            applied.append(unit.seq)
            unacked.append(msg_id)
            if trainer.step_count - last_ckpt_step >= cfg.train.checkpoint_every or len(applied) == total:
                checkpoint()
                store.ack(run, job, unacked)  # only now: a durable checkpoint covers these units
                unacked, last_ckpt_step = [], trainer.step_count
            rate = unit.steps * cfg.train.batch_size / dt
            extra = {"samples_per_s": rate, "unit": unit.seq, **unit_memory(device), "t": time.time()}
            store.log_metrics(run, job, {**metrics, "step": trainer.step_count, "samples": trainer.samples, **extra})
            store.incr(run, job, "units_applied")  # every application, re-applications after a crash included
            if cfg.eval.every and (unit.seq + 1) % cfg.eval.every == 0:  # the coordinator previews the chain
                self._export(storage, trainer, cfg, info, preview_rel(run, job), unit=unit.seq + 1)
                heartbeat.report(preview_unit=unit.seq + 1)
            heartbeat.report(
                state="training",
                units_done=len(applied),
                samples=trainer.samples,
                loss=metrics["loss"],
                samples_per_s=rate,
                step=trainer.step_count,
            )
            if len(applied) >= turn_ends and not unacked and len(applied) < total:
                heartbeat.report(state="queued")  # a checkpoint covers every unit applied: the next turn resumes
                return None

        self._export(storage, trainer, cfg, info)
        held = self.held_parameters()["trainable"]  # every trainable parameter alive in this process
        heartbeat.report(
            state="done",
            units_done=len(applied),
            samples=trainer.samples,
            finished_at=time.time(),
            process_trainable_params=held,
        )
        return {
            "job": str(job),
            "units": len(applied),
            "step": trainer.step_count,
            "samples": trainer.samples,
            "trainable_params": trainable_parameters(net),
            "pid": os.getpid(),
        }

    def _claim(self, store: RunStore, start: int, total: int) -> list[tuple[str, WorkUnit]]:
        """The units to apply first: every pending one (claimed), and before them those from ``start``
        that were acknowledged after a checkpoint that turned out unusable (the worker fell back to an
        older one): read again from the stream, where acknowledged units stay."""
        run, job = self.run_id, self.job
        queue = store.claim_pending(run, job, self.consumer)
        if not any(u.seq >= start for _, u in queue):  # the next unit never delivered, if any
            queue += store.next_units(run, job, self.consumer, count=1, block_ms=None)
        first = min((u.seq for _, u in queue if u.seq >= start), default=total)
        if first == start:
            return queue
        # units [start, first) were delivered (units are delivered in order) and are not pending: acknowledged
        again = [(i, u) for i, u in store.units_from(run, job, start) if u.seq < first]
        log.warning("%s: re-applying units %d..%d (acknowledged after the unusable checkpoint)", job, start, first - 1)
        return sorted(queue + again, key=lambda entry: entry[1].seq)

    def _apply(
        self, trainer, unit: WorkUnit, rows: tuple[torch.Tensor, ...], edges: torch.Tensor, space: str = "sigma"
    ) -> dict:
        steps = apply_unit(trainer, unit, rows)
        level, losses = torch.cat([s["sigma"] for s in steps]), torch.cat([s["losses"] for s in steps])
        weight = trainer.loss_fn.weight  # the family's per-sample loss weight (a WeightedLoss)
        return {
            "loss": losses.mean().item(),
            "effective_batch": sum(effective_batch(weight(s["sigma"])) for s in steps) / len(steps),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "lr": steps[-1]["lr"],
            **bucket_losses(level, losses, edges, space),
        }

    def _export(
        self, storage: Storage, trainer: BlockTrainer, cfg: RunConfig, info: Job, rel: str | None = None, **extra
    ) -> None:
        """The EMA weights with what rebuilds the block (``dblocks.build.block_from_export``), at
        ``rel`` (default: the finished block's export)."""
        plain = cfg.to_dict()
        meta = {
            "spec": asdict(info.spec),
            "model": plain["model"],
            "noise": plain["noise"],
            "plan_hash": info.plan_hash,
            "seed": cfg.seed,
            "step": trainer.step_count,
            "samples": trainer.samples,
            "baseline": info.id.baseline,
            **extra,
        }
        tensors = {k: v.cpu() for k, v in trainer.ema.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "block.safetensors", tensors, meta)
            storage.put_file(path, rel or export_rel(self.run_id, self.job))
