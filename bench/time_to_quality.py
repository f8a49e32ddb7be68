"""Time to quality: B=2 DiffusionBlocks on two workers vs the end-to-end model on one, side by side.

Three single-threaded processes train at the same time, from one start barrier: the end-to-end
DiT (``model_plans(cfg)["e2e"]``, B=1 of the same depth, ``make_trainer(..., baseline=True)``) and
the two blocks of the B=2 plan (``model_plans(cfg)["blocks"]``), each on its own worker. Same data
(the built-in digits' train split), same per-block budget: every block and the end-to-end model
take ``train.steps`` steps at the same batch size, cut into the work units the coordinator would
cut (``make_units``, applied by ``apply_unit``). The model and training settings are those of
bench/quality.py's DiT rows (debug width, L=12).

After every unit a worker saves its EMA weights with its wall-clock and process CPU time since
its own start (the clocks include the save, a few ms). The parent evaluates the snapshots only
after training, so evaluation never competes with it:

held-out loss   the family's held-out weighted denoising loss (``heldout_loss`` over sigma ~ p, as
                ``DiT.evaluate`` computes it) of the end-to-end snapshots, and of the chained B=2
                model at every snapshot event: each block's latest snapshot at or before that wall
                time, behind the plan's router (so each block answers on its own sigma range).
target          the end-to-end model's final held-out loss.
time to target  the first chained B=2 evaluation at or below the target (a measured point; the
                linear interpolation with the point before it is in the JSON too). Wall ratio:
                that wall time / the end-to-end model's wall time to its final snapshot. CPU ratio:
                the CPU time of the busier block worker at that point / the end-to-end worker's
                CPU time; ``cpu_total_ratio`` sums both blocks' CPU (the cost, not the latency).
FD              ``DiT.evaluate`` of both final models (pixel and classifier-feature FD, sample
                accuracy) and of the B=2 snapshots that reached the target.

3 workers share the machine's cores (2 here): wall times include that contention, which is
lighter for the end-to-end worker once the blocks finish; CPU times are free of it.

    python bench/time_to_quality.py            # ~4 min on 2 cores -> bench/results/time_to_quality.{json,png}
    python bench/time_to_quality.py --quick --out /tmp/ttq   # CI smoke (< 90 s)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality import task_config  # noqa: E402  (the DiT settings of bench/quality.py)

from dblocks.build import build_block, make_trainer, model_plans  # noqa: E402
from dblocks.config import RunConfig  # noqa: E402
from dblocks.data import digits_data  # noqa: E402
from dblocks.families.dit import chain  # noqa: E402
from dblocks.metrics import heldout_loss  # noqa: E402
from dblocks.seeds import derive_seed  # noqa: E402
from dblocks.units import Shard, apply_unit, make_units  # noqa: E402
from worker.config import load_run_config  # noqa: E402

FULL = {"steps": 1500, "unit_steps": 50}
QUICK_SIZE = {"steps": 100, "unit_steps": 25}
JOBS = (("e2e", 0), ("blocks", 0), ("blocks", 1))  # (model_plans key, block index): one worker each
FD_KEYS = ("heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy")


def run_config(quick: bool) -> dict:
    """bench/quality.py's DiT config at B=2, with this benchmark's step budget and unit size."""
    size = QUICK_SIZE if quick else FULL
    d = task_config("dit", {"blocks": {"num": 2}}, 0, size["steps"], quick)
    d["train"]["unit_steps"] = size["unit_steps"]
    return d


def train_worker(cfg_dict: dict, model: str, index: int, out: str, start: mp.Barrier) -> None:
    """One worker: train one job unit by unit, saving its EMA weights and clocks after each unit."""
    torch.set_num_threads(1)
    cfg = load_run_config(cfg_dict)
    spec = model_plans(cfg)[model][index]
    rows = digits_data().split("train")
    trainer = make_trainer(cfg, spec, baseline=model == "e2e")
    shards = [Shard("train", len(rows[1]))]
    units = make_units(cfg.train.steps, cfg.train.unit_steps, shards, derive_seed(cfg.seed, model), spec.index)
    start.wait()
    t0, c0, epoch = time.perf_counter(), time.process_time(), time.time()
    for unit in units:
        apply_unit(trainer, unit, rows)
        snap = {
            "step": trainer.step_count,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "started_at": epoch,
            "ema": trainer.ema.state_dict(),
        }
        torch.save(snap, Path(out) / f"{model}{index}-{unit.seq:04d}.pt")


def train_all(cfg_dict: dict, out: Path) -> float:
    """The three workers at once (spawned processes); returns the wall seconds of the whole phase."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(JOBS))
    procs = [ctx.Process(target=train_worker, args=(cfg_dict, m, i, str(out), start)) for m, i in JOBS]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [f"{m}/{i} (exit {p.exitcode})" for (m, i), p in zip(JOBS, procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker failed: {', '.join(failed)}")
    return time.perf_counter() - t0


def load_snapshots(out: Path, model: str, index: int) -> list[dict]:
    return [torch.load(p) for p in sorted(out.glob(f"{model}{index}-*.pt"))]


class Judge:
    """The held-out loss of a model (one net per block of its plan) from snapshots of its blocks."""

    def __init__(self, cfg: RunConfig, model: str, x: torch.Tensor, y: torch.Tensor):
        self.cfg, self.model, self.x, self.y = cfg, model, x, y
        self.plan = model_plans(cfg)[model]
        self.nets = [build_block(cfg, spec, baseline=model == "e2e").eval() for spec in self.plan]

    def load(self, snaps: list[dict]) -> list[torch.nn.Module]:
        for net, snap in zip(self.nets, snaps):
            net.load_state_dict(snap["ema"])
        return self.nets

    def loss(self, snaps: list[dict]) -> float:
        lv = self.cfg.levels
        router = chain(self.load(snaps), self.plan, lv.sigma_data)
        return heldout_loss(router, self.x, self.y, lv.sigma_min, lv.sigma_max, lv)

    def metrics(self, snaps: list[dict], data) -> dict:
        res = self.cfg.family.evaluate(self.load(snaps), self.plan, self.cfg, data, baseline=self.model == "e2e")
        return {k: res[k] for k in FD_KEYS if k in res}


def e2e_curve(judge: Judge, snaps: list[dict]) -> list[dict]:
    return [{"step": s["step"], "wall_s": s["wall_s"], "cpu_s": s["cpu_s"], "loss": judge.loss([s])} for s in snaps]


def chained_curve(judge: Judge, per_block: list[list[dict]]) -> tuple[list[dict], list[list[dict]]]:
    """The chained model at every snapshot event once every block has one: each block's latest
    snapshot at or before that wall time. Returns the curve and the snapshots each point used."""
    events = sorted({s["wall_s"] for snaps in per_block for s in snaps})
    curve, used = [], []
    for t in events:
        latest = [
            max((s for s in snaps if s["wall_s"] <= t), key=lambda s: s["wall_s"], default=None) for snaps in per_block
        ]
        if None in latest:
            continue
        cpus = [s["cpu_s"] for s in latest]
        curve.append(
            {
                "wall_s": t,
                "cpu_s": max(cpus),  # the busier worker: what the chain waited for
                "cpu_total_s": sum(cpus),
                "steps": [s["step"] for s in latest],
                "loss": judge.loss(latest),
            }
        )
        used.append(latest)
    return curve, used


def time_to_target(curve: list[dict], target: float) -> tuple[int | None, float | None]:
    """Index of the first point at or below ``target``, and the wall time linearly interpolated
    between that point and the one before it (None where the curve never gets there)."""
    k = next((i for i, p in enumerate(curve) if p["loss"] <= target), None)
    if k is None:
        return None, None
    if k == 0:
        return k, curve[0]["wall_s"]
    a, b = curve[k - 1], curve[k]
    return k, a["wall_s"] + (a["loss"] - target) / (a["loss"] - b["loss"]) * (b["wall_s"] - a["wall_s"])


def measure(cfg_dict: dict, tmp: Path) -> dict:
    train_seconds = train_all(cfg_dict, tmp)
    t0 = time.perf_counter()
    cfg, data = load_run_config(cfg_dict), digits_data()
    x, y = data.split("test")
    e2e, blocks = Judge(cfg, "e2e", x, y), Judge(cfg, "blocks", x, y)
    e2e_snaps = load_snapshots(tmp, "e2e", 0)
    block_snaps = [load_snapshots(tmp, "blocks", i) for i in range(len(blocks.plan))]
    curves = {"e2e": e2e_curve(e2e, e2e_snaps)}
    curves["blocks"], used = chained_curve(blocks, block_snaps)
    final = {"e2e": e2e.metrics([e2e_snaps[-1]], data), "blocks": blocks.metrics(used[-1], data)}

    end, target = curves["e2e"][-1], curves["e2e"][-1]["loss"]
    k, interpolated = time_to_target(curves["blocks"], target)
    reached = None
    if k is not None:
        p = curves["blocks"][k]
        reached = {
            "point": k,
            "steps": p["steps"],
            "loss": p["loss"],
            "wall_s": p["wall_s"],
            "wall_s_interpolated": interpolated,
            "cpu_s": p["cpu_s"],
            "cpu_total_s": p["cpu_total_s"],
            "metrics": blocks.metrics(used[k], data),
        }
    last = curves["blocks"][-1]
    return {
        "target_loss": target,
        "e2e_time_to_final": {"wall_s": end["wall_s"], "cpu_s": end["cpu_s"], "step": end["step"]},
        "blocks_reached": reached,
        "wall_ratio": reached and reached["wall_s"] / end["wall_s"],
        "wall_ratio_interpolated": reached and reached["wall_s_interpolated"] / end["wall_s"],
        "cpu_ratio": reached and reached["cpu_s"] / end["cpu_s"],
        "cpu_total_ratio": reached and reached["cpu_total_s"] / end["cpu_s"],
        "blocks_final_gap": {"abs": last["loss"] - target, "rel": last["loss"] / target - 1},
        "final": final,
        "curves": curves,
        "start_skew_s": max(s[0]["started_at"] for s in (e2e_snaps, *block_snaps))
        - min(s[0]["started_at"] for s in (e2e_snaps, *block_snaps)),
        "train_phase_wall_s": train_seconds,
        "eval_wall_s": time.perf_counter() - t0,
    }


def plot(result: dict, steps: int, path: Path) -> None:
    """Held-out loss against wall and against CPU time, both models, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, target = result["curves"], result["target_loss"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, clock, label in zip(axes, ("wall_s", "cpu_s"), ("wall time (s)", "CPU time of the (busier) worker (s)")):
        for model, name in (("e2e", "end-to-end, 1 worker"), ("blocks", "B=2, 2 workers (chained)")):
            ax.plot([p[clock] for p in curves[model]], [p["loss"] for p in curves[model]], marker=".", label=name)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target: e2e final")
        ax.set_xlabel(label)
        ax.set_yscale("log")
    axes[0].set_ylabel("held-out weighted loss")
    axes[0].legend()
    fig.suptitle(f"DiT on digits, L=12: time to quality ({steps} steps per block, 1 thread each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict) -> str:
    r, f, e = report["result"], report["result"]["final"], report["result"]["e2e_time_to_final"]
    reached = r["blocks_reached"]

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"target (e2e final held-out loss): {r['target_loss']:.4f}",
        f"{'':34s}{'e2e (1 worker)':>16s}{'B=2 (2 workers)':>17s}",
        f"{'wall s to e2e target':34s}{e['wall_s']:16.1f}{fmt(reached and reached['wall_s'], '.1f'):>17s}",
        f"{'CPU s per worker to e2e target':34s}{e['cpu_s']:16.1f}{fmt(reached and reached['cpu_s'], '.1f'):>17s}",
    ]
    for k in FD_KEYS:
        if k in f["e2e"]:
            lines.append(f"{k + ' at the end':34s}{f['e2e'][k]:16.4f}{f['blocks'][k]:17.4f}")
    if reached:
        lines.append(
            f"B=2 / e2e time to the target: wall {r['wall_ratio']:.3f} "
            f"(interpolated {r['wall_ratio_interpolated']:.3f}), "
            f"CPU per worker {r['cpu_ratio']:.3f}, CPU total {r['cpu_total_ratio']:.3f}; "
            f"FD feature of B=2 at that point {fmt(reached['metrics'].get('fd_feature'))}"
        )
    else:
        gap = r["blocks_final_gap"]
        lines.append(f"B=2 never reached the target: final gap {gap['abs']:+.4f} ({gap['rel']:+.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"CI smoke: {QUICK_SIZE['steps']} steps per block (< 90 s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    start, load_start = time.perf_counter(), list(os.getloadavg())
    cfg_dict = run_config(args.quick)
    with tempfile.TemporaryDirectory(prefix="dblocks-ttq-") as tmp:
        result = measure(cfg_dict, Path(tmp))
    report = {
        "command": shlex.join(["python", "bench/time_to_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_1_5_15_at_start_end": [load_start, list(os.getloadavg())],
        },
        "workers": {"processes": len(JOBS), "torch_threads_per_worker": 1, "jobs": [f"{m}/{i}" for m, i in JOBS]},
        "config": cfg_dict,
        "result": result,
    }
    report["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(result, cfg_dict["train"]["steps"], args.out / "time_to_quality.png")
    print(summary(report))
    print(f"whole run {report['wall_seconds']:.0f} s; wrote {args.out / 'time_to_quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
