"""One block's training process: the same class runs as a Ray actor or as ``python -m worker``.

``BlockWorker(redis_url, run_id, job, consumer).run()``:
1. reads the run's manifest from Redis and builds its block (only this block: ~1/B of the model),
2. takes the block's lease, loads its checkpoint from storage if there is one,
3. claims units left pending by a dead predecessor, then consumes new ones, applying each unit
   exactly once in sequence order (a unit the checkpoint already covers is acknowledged and
   skipped; a gap in the sequence is an error, never silently skipped),
4. checkpoints atomically every ``train.checkpoint_every`` steps (at unit boundaries) and only
   then acknowledges the units the checkpoint covers,
5. reports progress and per-unit metrics to Redis, and finally exports the EMA weights.
Ray is applied from outside (``ray.remote(BlockWorker)`` in coordinator/launch.py).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import torch

from dblocks.build import make_trainer
from dblocks.checkpoint import load_checkpoint, save_checkpoint
from dblocks.config import RunConfig
from dblocks.plan import BlockSpec
from dblocks.trainer import BlockTrainer
from dblocks.units import WorkUnit, apply_unit

from .shards import read_shard
from .state import RunState, StateError
from .storage import Storage

log = logging.getLogger(__name__)

SIGMA_BUCKETS = 4  # loss per sigma bucket: log-spaced buckets over the block's training range


def job_dir(run_id: str, job: str) -> str:
    return f"runs/{run_id}/{job}"


def checkpoint_rel(run_id: str, job: str) -> str:
    return f"{job_dir(run_id, job)}/checkpoint.safetensors"


def export_rel(run_id: str, job: str) -> str:
    """The finished block: EMA weights only, plus what is needed to rebuild it (metadata)."""
    return f"{job_dir(run_id, job)}/block.safetensors"


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bucket_losses(sigma: torch.Tensor, losses: torch.Tensor, lo: float, hi: float) -> dict[str, float]:
    """Mean loss in each of SIGMA_BUCKETS buckets of [lo, hi]: log-spaced for sigma, linear for a
    range that starts at 0 (MDM's masking time t)."""
    if lo > 0:
        edges = torch.logspace(math.log10(lo), math.log10(hi), SIGMA_BUCKETS + 1, dtype=torch.float64)
    else:
        edges = torch.linspace(lo, hi, SIGMA_BUCKETS + 1, dtype=torch.float64)
    idx = torch.bucketize(sigma.double(), edges[1:-1])
    return {f"loss_sigma_bucket{k}": losses[idx == k].mean().item() for k in range(SIGMA_BUCKETS) if (idx == k).any()}


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class BlockWorker:
    def __init__(self, redis_url: str, run_id: str, job: str, consumer: str):
        self.redis_url, self.run_id, self.job, self.consumer = redis_url, run_id, job, consumer
        self.trainer: BlockTrainer | None = None

    # Ray calls these as actor methods; nothing here knows about Ray.
    def pid(self) -> int:
        return os.getpid()

    def held_parameters(self) -> dict:
        """What this process holds: trainable parameters of every torch module it has built."""
        import gc

        params = {id(p): p for p in gc.get_objects() if isinstance(p, torch.nn.Parameter) and p.requires_grad}
        return {"trainable": sum(p.numel() for p in params.values()),
                "block": trainable_parameters(self.trainer.net) if self.trainer else 0}  # fmt: skip

    def run(self) -> dict:
        state = RunState(self.redis_url)
        manifest = state.manifest(self.run_id)
        if self.job not in manifest["jobs"]:
            raise StateError(f"run {self.run_id} has no {self.job} (it has {', '.join(manifest['jobs'])})")
        try:
            return self._run(state, manifest)
        except BaseException as e:
            state.report(self.run_id, self.job, state="failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            state.release(self.run_id, self.job, self.consumer)

    def _run(self, state: RunState, manifest: dict) -> dict:
        run, job = self.run_id, self.job
        cfg = RunConfig.from_dict(manifest["config"])
        info = manifest["jobs"][job]
        spec, plan_id, total = BlockSpec(**info["spec"]), info["plan_id"], info["units"]
        ttl = cfg.workers.lease_seconds
        state.acquire(run, job, self.consumer, ttl)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        storage = Storage(manifest["storage"])
        device = cfg.train.resolved_device()

        baseline = info["model"] == "e2e"
        trainer = self.trainer = make_trainer(cfg, spec, baseline=baseline, device=device)
        net = trainer.net
        applied: list[int] = []
        ckpt = checkpoint_rel(run, job)
        with tempfile.TemporaryDirectory() as tmp:
            if storage.exists(ckpt):
                tensors, meta = load_checkpoint(storage.get_file(ckpt, Path(tmp) / "ckpt.safetensors"))
                if meta.get("plan") != plan_id:
                    raise StateError(f"{storage.uri(ckpt)} was written by plan {meta.get('plan')}, this run's is {plan_id}")
                trainer.load_state_dict(tensors, meta)
                applied = meta["units"]
                log.info("%s: resumed after unit %d (step %d)", job, len(applied) - 1, trainer.step_count)

        def checkpoint() -> None:
            tensors, meta = trainer.state_dict()
            with tempfile.TemporaryDirectory() as tmp:
                path = save_checkpoint(Path(tmp) / "ckpt.safetensors", tensors, {**meta, "plan": plan_id, "units": applied})
                storage.put_file(path, ckpt)

        common = dict(pid=os.getpid(), host=socket.gethostname(), consumer=self.consumer, units_total=total, device=str(device),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                      trainable_params=trainable_parameters(net), samples_total=cfg.train.steps * cfg.train.batch_size)  # fmt: skip
        state.report(run, job, self.consumer, ttl, state="training", units_done=len(applied), samples=trainer.samples,
                     started_at=time.time(), **common)  # fmt: skip
        shards: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        unacked: list[str] = []
        last_ckpt_step = trainer.step_count
        queue = state.claim_pending(run, job, self.consumer)
        while len(applied) < total:
            if not queue:
                queue = state.next_units(run, job, self.consumer, count=1, block_ms=int(min(ttl / 3, 2) * 1000))
                if not queue:  # nothing new yet: stay alive
                    state.report(run, job, self.consumer, ttl, state="waiting")
                    continue
            msg_id, unit = queue.pop(0)
            if unit.seq < len(applied):  # the checkpoint covers it (we died between checkpoint and ack)
                state.ack(run, job, [msg_id])
                continue
            if unit.seq > len(applied):
                raise StateError(f"{job}: unit {len(applied)} is missing from the queue (got unit {unit.seq})")
            t0 = time.perf_counter()
            metrics = self._apply(trainer, unit, storage, shards)
            dt = time.perf_counter() - t0
            applied.append(unit.seq)
            unacked.append(msg_id)
            if trainer.step_count - last_ckpt_step >= cfg.train.checkpoint_every or len(applied) == total:
                checkpoint()
                state.ack(run, job, unacked)  # only now: a durable checkpoint covers these units
                unacked, last_ckpt_step = [], trainer.step_count
            rate = unit.steps * cfg.train.batch_size / dt
            state.log_metrics(run, job, {**metrics, "step": trainer.step_count, "samples": trainer.samples,
                                         "samples_per_s": rate, "unit": unit.seq, "rss_mb": _rss_mb(), "t": time.time()})  # fmt: skip
            state.incr(run, job, "units_applied")  # every application, re-applications after a crash included
            state.report(run, job, self.consumer, ttl, state="training", units_done=len(applied), samples=trainer.samples,
                         loss=metrics["loss"], samples_per_s=rate, step=trainer.step_count)  # fmt: skip

        self._export(storage, trainer, spec, cfg, plan_id, baseline)
        held = self.held_parameters()["trainable"]  # every trainable parameter alive in this process
        state.report(run, job, self.consumer, ttl, state="done", units_done=len(applied), samples=trainer.samples,
                     finished_at=time.time(), process_trainable_params=held)  # fmt: skip
        return {"job": job, "units": len(applied), "step": trainer.step_count, "samples": trainer.samples,
                "trainable_params": trainable_parameters(net), "pid": os.getpid()}  # fmt: skip

    def _apply(self, trainer: BlockTrainer, unit: WorkUnit, storage: Storage, shards: dict) -> dict:
        if unit.shard not in shards:
            shards[unit.shard] = read_shard(storage, unit.shard)
        rows = tuple(c[unit.row_start : unit.row_end] for c in shards[unit.shard])
        steps = apply_unit(trainer, unit, rows)
        sigma, losses = torch.cat([s["sigma"] for s in steps]), torch.cat([s["losses"] for s in steps])
        return {
            "loss": losses.mean().item(),
            "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
            "lr": steps[-1]["lr"],
            **bucket_losses(sigma, losses, trainer.spec.train_lo, trainer.spec.train_hi),
        }

    def _export(self, storage: Storage, trainer: BlockTrainer, spec: BlockSpec, cfg: RunConfig, plan_id: str,
                baseline: bool) -> None:  # fmt: skip
        meta = {"spec": asdict(spec), "model": asdict(cfg.model), "noise": asdict(cfg.noise), "plan": plan_id,
                "seed": cfg.seed, "step": trainer.step_count, "samples": trainer.samples, "baseline": baseline}  # fmt: skip
        tensors = {k: v.cpu() for k, v in trainer.ema.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            storage.put_file(save_checkpoint(Path(tmp) / "block.safetensors", tensors, meta), export_rel(self.run_id, self.job))
