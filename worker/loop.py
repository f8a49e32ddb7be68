"""Train one block to completion, checkpointing and resuming: the worker's whole job.

In-process for now; the distributed trainer wraps this same loop in a Ray actor.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dblocks.build import block_loss, build_block
from dblocks.checkpoint import load_checkpoint, save_checkpoint
from dblocks.config import RunConfig
from dblocks.data import BatchStream, ImageSplit
from dblocks.plan import BlockSpec
from dblocks.seeds import block_seed
from dblocks.trainer import BlockTrainer

log = logging.getLogger(__name__)


def checkpoint_path(ckpt_dir: Path, spec: BlockSpec) -> Path:
    return Path(ckpt_dir) / f"block{spec.index}.safetensors"


def train_block(
    cfg: RunConfig, spec: BlockSpec, data: ImageSplit, ckpt_dir: Path, plan_id: str, *, label: str = "block"
) -> BlockTrainer:
    """Train ``spec``'s block for ``cfg.train.steps`` steps; resume from its checkpoint if present."""
    device = cfg.train.resolved_device()
    net = build_block(cfg.model, spec, cfg.seed).to(device)
    trainer = BlockTrainer(net, spec, block_loss(cfg.model), cfg.train, cfg.noise, cfg.seed)
    path = checkpoint_path(ckpt_dir, spec)
    if path.exists():
        tensors, meta = load_checkpoint(path)
        if meta.get("plan") != plan_id:
            raise RuntimeError(
                f"{path} was written by another plan ({meta.get('plan')}, this run is {plan_id}): "
                "choose a new output_dir or move the old checkpoints away"
            )
        trainer.load_state_dict(tensors, meta)
        log.info("%s %d: resumed at step %d from %s", label, spec.index, trainer.step_count, path)
    stream = BatchStream(len(data.train_y), cfg.train.batch_size, block_seed(cfg.seed, spec.index, "data"))

    def checkpoint() -> None:
        tensors, meta = trainer.state_dict()
        save_checkpoint(path, tensors, {**meta, "plan": plan_id})

    t0, s0 = time.perf_counter(), trainer.samples
    while trainer.step_count < cfg.train.steps:
        idx = stream.indices(trainer.step_count)
        metrics = trainer.step((data.train_x[idx].to(device), data.train_y[idx].to(device)))
        done = trainer.step_count
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            rate = (trainer.samples - s0) / (time.perf_counter() - t0)
            log.info(
                "%s %d [sigma %.3g-%.3g]: step %d/%d loss %.4f grad %.2f  %.0f samples/s",
                label, spec.index, spec.train_lo, spec.train_hi, done, cfg.train.steps,
                metrics["loss"], metrics["grad_norm"], rate,
            )  # fmt: skip
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            checkpoint()
    return trainer
