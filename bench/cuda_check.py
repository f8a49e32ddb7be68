"""The CUDA path, checked: the debug DiT preset (B=2 blocks + the end-to-end model) trained on a GPU
and on the CPU side by side in one process, then evaluated the same way on the CPU.

Pure ``dblocks`` (no Ray, Redis or MLflow: the GPU machine has none of them): the same work units
the coordinator would cut (``make_units`` over 2 contiguous shards of the train split), applied by
the same ``BlockTrainer`` with ``apply_unit``, on ``--device`` and on ``cpu``. Reported per job:
final EMA weights' held-out metrics (``DiT.evaluate`` on the CPU), the mean training loss of the
last unit, the median step time, and on CUDA the peak allocated / reserved memory of that job
(``torch.cuda.max_memory_allocated`` after a reset). Ratios are taken inside this one run:
a block's peak memory / the end-to-end model's, CUDA step time / CPU step time.

    python bench/cuda_check.py                 # on a CUDA machine; writes bench/results/cuda_check.json
    python bench/cuda_check.py --device cpu --quick --out /tmp/x   # the CPU path of the same script
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dblocks.build import make_trainer, model_plans
from dblocks.config import BlocksConfig, RunConfig, SampleConfig, TrainConfig, model_config, resolve_device
from dblocks.data import digits_data
from dblocks.seeds import derive_seed
from dblocks.units import Shard, apply_unit, make_units


def debug_config(steps: int) -> RunConfig:
    """The ``experiment=debug`` preset (configs/experiment/debug.yaml), built without Hydra."""
    train = TrainConfig(
        steps=steps, batch_size=64, warmup_samples=2000, ema_halflife_samples=2000, checkpoint_every=100
    )
    return RunConfig(
        name="debug",
        model=model_config({"family": "dit", "size": "debug"}),
        blocks=BlocksConfig(num=2),
        train=train,
        sample=SampleConfig(steps=20, per_class=10),
    )


def shards_of(x: torch.Tensor, y: torch.Tensor, num: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``num`` contiguous shards of the train split, as the coordinator writes them."""
    return {f"shard{i}": (xs, ys) for i, (xs, ys) in enumerate(zip(x.tensor_split(num), y.tensor_split(num)))}


def train_job(cfg: RunConfig, model: str, spec, shards: dict, device: torch.device) -> dict:
    """Every unit of one job on ``device``: step times, last unit's loss, peak CUDA memory."""
    trainer = make_trainer(cfg, spec, baseline=model == "e2e", device=device)
    listed = [Shard(name, len(rows[1])) for name, rows in shards.items()]
    units = make_units(cfg.train.steps, cfg.train.unit_steps, listed, derive_seed(cfg.seed, model), spec.index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for unit in units:
        rows = tuple(c[unit.row_start : unit.row_end] for c in shards[unit.shard])
        if device.type == "cuda":
            rows = tuple(c.pin_memory() for c in rows)
        t0 = time.perf_counter()
        steps = apply_unit(trainer, unit, rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / len(steps))
        losses = [s["loss"] for s in steps]
    out = {"median_step_s": statistics.median(times[1:] or times), "last_unit_loss": statistics.fmean(losses)}
    if device.type == "cuda":
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    out["ema"] = trainer.ema.to("cpu").eval()
    return out


def run_device(cfg: RunConfig, device: torch.device, shards: dict, data) -> dict:
    """Train every job of the debug preset on ``device``; evaluate each model on the CPU."""
    plans, results = model_plans(cfg), {}
    for model, plan in plans.items():
        jobs = [train_job(cfg, model, spec, shards, device) for spec in plan]
        metrics = cfg.family.evaluate([j.pop("ema") for j in jobs], plan, cfg, data, baseline=model == "e2e")
        floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
        results[model] = {"jobs": jobs, "metrics": floats}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (the side compared with the CPU)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per job (the debug preset's 200)")
    ap.add_argument("--quick", action="store_true", help="50 steps (CI size)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cfg = debug_config(50 if args.quick else args.steps)
    device = resolve_device(args.device)
    data = digits_data()  # the built-in digits' split, as `dblocks-data input=builtin:digits` prepares it
    shards = shards_of(*data.split("train"), 2)
    torch.manual_seed(0)
    sides = {"device": run_device(cfg, device, shards, data), "cpu": run_device(cfg, torch.device("cpu"), shards, data)}
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "steps": cfg.train.steps,
        "sides": sides,
        "ratios": ratios(sides),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "sides"}, indent=2))
    for side, res in sides.items():
        for model, r in res.items():
            print(side, model, {k: round(v, 4) for k, v in r["metrics"].items()})


def ratios(sides: dict) -> dict:
    """Side-by-side ratios of this run: memory per block / end-to-end, device step time / CPU."""
    dev, cpu = sides["device"], sides["cpu"]
    out = {}
    e2e = dev["e2e"]["jobs"][0]
    for b, job in enumerate(dev["blocks"]["jobs"]):
        if "peak_allocated_mb" in job:
            out[f"block{b}_peak_allocated_over_e2e"] = job["peak_allocated_mb"] / e2e["peak_allocated_mb"]
        out[f"block{b}_step_time_device_over_cpu"] = job["median_step_s"] / cpu["blocks"]["jobs"][b]["median_step_s"]
    out["e2e_step_time_device_over_cpu"] = e2e["median_step_s"] / cpu["e2e"]["jobs"][0]["median_step_s"]
    for model in dev:
        out[f"{model}_heldout_loss_device_minus_cpu"] = (
            dev[model]["metrics"]["heldout_loss"] - cpu[model]["metrics"]["heldout_loss"]
        )
    return out


if __name__ == "__main__":
    main()
