"""The main job, in-process: plan, train every block alone, train the baseline, evaluate, report.

Each block trains with nothing but the data and its own plan entry (worker.loop.train_block),
exactly as it will on its own worker; the distributed trainer replaces the sequential loop
below with one actor per block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dblocks.config import RunConfig
from dblocks.data import load_digits_split
from dblocks.evaluate import evaluate
from dblocks.metrics import accuracy, train_digits_classifier
from dblocks.plan import BlockSpec, make_plan, plan_hash
from worker.loop import train_block

from .report import format_table, save_grid, write_metrics

log = logging.getLogger(__name__)


def plan_for(cfg: RunConfig, num_blocks: int) -> list[BlockSpec]:
    n = cfg.noise
    return make_plan(
        num_blocks, cfg.model.dit().layers, gamma=cfg.blocks.gamma, partition=cfg.blocks.partition,
        sigma_min=n.sigma_min, sigma_max=n.sigma_max, p_mean=n.p_mean, p_std=n.p_std,
    )  # fmt: skip


def train_model(cfg: RunConfig, plan: list[BlockSpec], data, out: Path, label: str) -> tuple[list, list[float]]:
    """Train every block of ``plan`` alone; return the EMA networks and each block's wall seconds."""
    # What the blocks must agree on; training settings (steps, lr, ...) may change on resume.
    plan_id = plan_hash(plan, model=asdict(cfg.model), noise=asdict(cfg.noise), seed=cfg.seed)
    nets, seconds = [], []
    for spec in plan:
        t0 = time.perf_counter()
        trainer = train_block(cfg, spec, data, out / "checkpoints", plan_id, label=label)
        seconds.append(time.perf_counter() - t0)
        log.info("%s %d done in %.1f s", label, spec.index, seconds[-1])
        nets.append(trainer.ema.eval().cpu())  # evaluation runs on the CPU
    return nets, seconds


def run(cfg: RunConfig) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_digits_split(cfg.data.test_size, cfg.data.split_seed)
    plan = plan_for(cfg, cfg.blocks.num)
    for s in plan:
        log.info("plan: block %d layers [%d, %d) sigma [%.4g, %.4g] (training [%.4g, %.4g])",
                 s.index, s.layer_start, s.layer_end, s.sigma_lo, s.sigma_hi, s.train_lo, s.train_hi)  # fmt: skip

    models = {}  # name -> (plan, output folder); blocks.num=1 is the end-to-end model itself
    if cfg.blocks.num > 1:
        models[f"DiffusionBlocks B={cfg.blocks.num}"] = (plan, out / "blocks")
    if cfg.baseline or cfg.blocks.num == 1:
        models["end-to-end"] = (plan_for(cfg, 1), out / "baseline")
    trained, train_seconds = {}, {}
    for name, (p, d) in models.items():
        trained[name], train_seconds[name] = train_model(cfg, p, data, d, name.split()[0])

    t0 = time.perf_counter()
    classifier = train_digits_classifier(data.train_x, data.train_y, seed=0)
    clf_acc = accuracy(classifier, data.test_x, data.test_y)
    log.info("digits classifier: %.1f%% on the real test split (%.1f s)", 100 * clf_acc, time.perf_counter() - t0)

    ranges = [(s.sigma_lo, s.sigma_hi) for s in plan]
    results = {}
    for name, nets in trained.items():
        results[name] = evaluate(nets, models[name][0], data, classifier, cfg.sample, cfg.noise, ranges=ranges, seed=cfg.seed)
        shown = min(cfg.sample.per_class, 10)  # a 10 x 10 grid: row = digit
        samples = results[name]["samples"]  # class-major: 0, 0, ..., 1, 1, ...
        per_class = samples.reshape(10, cfg.sample.per_class, *samples.shape[1:])[:, :shown]
        grid = save_grid(per_class.flatten(0, 1), models[name][1] / "samples.png", columns=shown)
        log.info("%s: sample grid %s", name, grid)
    print(f"\nguidance {cfg.sample.guidance}, {cfg.sample.steps} Euler grid points, {cfg.train.steps} steps per block; "
          f"classifier accuracy on real test images {clf_acc:.1%}")  # fmt: skip
    print(format_table(results, ranges))
    write_metrics(
        results, out / "metrics.json", classifier_test_accuracy=clf_acc, config=cfg.to_dict(),
        train_seconds_per_block=train_seconds,  # 0-ish for blocks resumed already complete
        wall_seconds=time.perf_counter() - t_start,
    )  # fmt: skip
    return results
