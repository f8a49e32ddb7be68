"""Quality of DiffusionBlocks vs end-to-end training, every family, side by side in one run.

For each family, the paper's B (DiT and ViT 3, AR 4, MDM 3; the recurrent core is one block)
against the end-to-end baseline of the same total depth, each over ``--seeds`` seeds (mean +-
std; the DiT ablations other than the partition one over the first ABLATION_SEEDS of them).
Budget rule, the same for both sides: every block and the baseline take ``steps`` optimizer steps
at the same batch size, learning rate, warm-up and EMA (matched layer-compute: the B blocks
together cost about one end-to-end model). Nothing is tuned per side.

Rows
  dit        held-out weighted denoising loss, pixel FD, classifier-feature FD, sample accuracy;
             ablations: equal-mass vs uniform-log partition, with vs without w(sigma), B in {1,2,3,4,6}
  vit        test accuracy (B-step inference: one call per block)
  ar         validation CE of the next-token prediction at sigma_min (after the B-step chain), CE at
             sigma_max, next-char accuracy; pure and mixed objectives; sample text
  mdm        test bits per character (MD4 ELBO); sample text
  recurrent  validation loss after K iterations: single-pass diffusion core vs truncated BPTT

Training runs in-process through the library (``make_trainer`` + ``BlockTrainer.step``, the code
the workers run), one model per task on a pool of single-threaded processes; the distributed path
is measured in bench/scaling.py and tested in tests/test_distributed.py.

    python bench/quality.py                 # the full run (~60 min on 2 cores) -> bench/results/
    python bench/quality.py --quick --out /tmp/q   # CI smoke (< 5 min): 1 seed, few steps
    python bench/quality.py --families dit  # one family; its rows are merged into quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dblocks.build import build_block, make_trainer, plan_for  # noqa: E402
from dblocks.config import RunConfig  # noqa: E402
from dblocks.data import BatchStream, digits_data, load_digits_split  # noqa: E402
from dblocks.families import FAMILIES as REGISTRY  # noqa: E402
from dblocks.seeds import derive_seed  # noqa: E402
from dblocks.text import load_text_split, shakespeare_data  # noqa: E402
from worker.config import load_run_config  # noqa: E402

# family -> base config (the same for both sides), the paper's B, and the variants compared.
# A variant: (name, config overrides, baseline?[, at most this many seeds]). "e2e" is always the
# end-to-end baseline. The DiT ablations beyond the partition check run on the first
# ABLATION_SEEDS seeds only, so that the full run fits in an hour on 2 cores.
ABLATION_SEEDS = 2
TRAIN = {"batch_size": 64, "lr": 1e-3, "warmup_samples": 5000, "ema_halflife_samples": 10000, "device": "cpu"}


def text_base(family: str, **extra) -> dict:
    """A text family's base config at the benchmark size: tiny, 32-character context, batch 32."""
    model = {"family": family, "size": "tiny", "seq_len": 32}
    return {"name": f"q-{family}", "model": model, "data": {"source": "text"}, "train": {"batch_size": 32}, **extra}


FAMILIES: dict[str, dict] = {
    "dit": {
        "base": {
            "name": "q-dit",
            "model": {"family": "dit", "size": "debug", "layers": 12},
            "sample": {"steps": 50, "guidance": 1.5, "per_class": 50},
        },
        "B": 3,
        "steps": 1000,
        "variants": [
            ("e2e", {"blocks": {"num": 1}}, True),
            ("B=3", {}, False),
            ("B=3 uniform-log", {"blocks": {"partition": "uniform_log"}}, False),  # an acceptance check: all seeds
            ("B=3 without w(sigma)", {"train": {"loss_weighting": False}}, False, ABLATION_SEEDS),
            ("B=2", {"blocks": {"num": 2}}, False, ABLATION_SEEDS),
            ("B=4", {"blocks": {"num": 4}}, False, ABLATION_SEEDS),
            ("B=6", {"blocks": {"num": 6}}, False, ABLATION_SEEDS),
        ],
        "metrics": ["heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy"],
    },
    "vit": {
        "base": {"name": "q-vit", "model": {"family": "vit", "size": "tiny", "layers": 12}},  # the paper's depth
        "B": 3,
        "steps": 1000,
        "variants": [("e2e", {}, True), ("B=3", {}, False)],
        "metrics": ["test_accuracy"],
    },
    "ar": {
        "base": text_base("ar", blocks={"gamma": 0.1}),
        "B": 4,
        "steps": 600,
        "variants": [("e2e", {}, True), ("B=4 pure", {}, False), ("B=4 mixed", {"model": {"mixed": True}}, False)],
        "shares_first_blocks": {"B=4 mixed": "B=4 pure"},  # the mixed head changes the last block only
        "metrics": ["val_ce", "val_ce_sigma_max", "val_accuracy", "val_ce_next_head"],
    },
    "mdm": {
        "base": text_base("mdm", blocks={"gamma": 0.0}),
        "B": 3,
        "steps": 1000,
        "variants": [("e2e", {}, True), ("B=3", {}, False)],
        "metrics": ["test_bpc"],
    },
    "recurrent": {
        "base": text_base("recurrent"),
        "B": 1,
        "steps": 1000,
        "variants": [("e2e", {}, True), ("diffusion core", {}, False)],
        "metrics": ["val_loss", "val_bpc", "val_accuracy", "val_loss_first_call"],
    },
}
QUICK = {"steps": 30, "seeds": 1, "sample": {"steps": 10, "per_class": 5}}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def task_config(family: str, variant: dict, seed: int, steps: int, quick: bool) -> dict:
    spec = FAMILIES[family]
    d = merge({"seed": seed, "blocks": {"num": spec["B"]}, "train": {**TRAIN, "steps": steps}}, spec["base"])
    if quick:  # the sampler settings of the image families (the others ignore them)
        d = merge(d, {"sample": QUICK["sample"]})
    return merge(d, variant)


def batches(family_data: str, seq_len: int | None):
    """The training tensors of the built-in set: (images, labels) or (windows,)."""
    if family_data == "digits":
        s = load_digits_split()
        return (s.train_x, s.train_y)
    return (load_text_split(seq_len).train,)


HELD_OUT = {"digits": digits_data, "text": shakespeare_data}  # the held-out data each family is evaluated on


def train_block(cfg: RunConfig, spec, baseline: bool, rows: tuple) -> tuple[torch.nn.Module, float, float]:
    """One block (or the baseline) for ``cfg.train.steps`` steps: (EMA net, mean of the last 50 losses, seconds)."""
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, spec, baseline=baseline)
    stream = BatchStream(len(rows[0]), cfg.train.batch_size, derive_seed(cfg.seed, "batches", spec.index, baseline))
    last = [trainer.step(tuple(c[stream.indices(step)] for c in rows))["loss"] for step in range(cfg.train.steps)]
    return trainer.ema.eval(), statistics.fmean(last[-50:]), time.perf_counter() - t0


def train_and_evaluate(family: str, name: str, cfg_dict: dict, baseline: bool, siblings: tuple = ()) -> list[dict]:
    """One model (all B blocks one after another, or the baseline), trained and evaluated here.

    ``siblings``: (name, config) of variants that differ from this one in the LAST block only (the
    AR mixed head). They reuse this model's first B-1 blocks -- the same construction, seeds and
    batches, so training them again would give the same tensors (checked on the initial weights)
    -- and train only their own last block. Their train_seconds include the shared blocks' time.
    """
    torch.set_num_threads(1)
    cfg = load_run_config(cfg_dict)
    plan = plan_for(cfg, 1 if baseline else cfg.blocks.num)
    rows = batches(cfg.data.source, cfg.seq_len)
    trained = [train_block(cfg, spec, baseline, rows) for spec in plan]
    models = [(name, cfg, trained)]
    for sib_name, sib_dict in siblings:
        sib = load_run_config(sib_dict)
        if plan_for(sib, sib.blocks.num) != plan:
            raise ValueError(f"{sib_name}: its block plan differs from {name}'s; it cannot share blocks")
        for spec in plan[:-1]:
            a, b = (build_block(c, spec).state_dict() for c in (cfg, sib))
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                raise ValueError(f"{sib_name}: block {spec.index} differs from {name}'s; it cannot share blocks")
        models.append((sib_name, sib, trained[:-1] + [train_block(sib, plan[-1], False, rows)]))
    results = []
    for model_name, model_cfg, blocks in models:
        nets = [net for net, _, _ in blocks]
        t1 = time.perf_counter()
        res = model_cfg.family.evaluate(nets, plan, model_cfg, HELD_OUT[cfg.data.source](), baseline=baseline)
        out = {k: v for k, v in res.items() if isinstance(v, (float, int, str)) and not isinstance(v, bool)}
        out.update(
            train_seconds=sum(sec for _, _, sec in blocks),
            eval_seconds=time.perf_counter() - t1,
            final_train_loss=[loss for _, loss, _ in blocks],
        )
        results.append({"family": family, "model": model_name, "seed": model_cfg.seed, "metrics": out})
    return results


def summarise(results: list[dict]) -> dict:
    """family -> model -> metric -> {mean, std, values}; text samples of the first seed."""
    table: dict = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        cell = table.setdefault(r["family"], {}).setdefault(r["model"], {})
        for k, v in r["metrics"].items():
            if isinstance(v, str):
                cell.setdefault(k, v)
            elif isinstance(v, (int, float)):
                cell.setdefault(k, {"values": []})["values"].append(float(v))
    for fam in table.values():
        for cell in fam.values():
            for v in cell.values():
                if isinstance(v, dict):
                    v["mean"] = statistics.fmean(v["values"])
                    v["std"] = statistics.stdev(v["values"]) if len(v["values"]) > 1 else 0.0
    return table


def mean(table: dict, fam: str, model: str, key: str) -> float:
    try:
        return table[fam][model][key]["mean"]
    except KeyError:
        return math.nan


def checks(table: dict) -> dict:
    """The issue's acceptance figures, computed from the means (reported, never tuned for)."""
    out = {}
    if "vit" in table:
        gap = mean(table, "vit", "e2e", "test_accuracy") - mean(table, "vit", "B=3", "test_accuracy")
        out["vit: e2e - B=3 test accuracy (points) <= 1.5"] = {"value": 100 * gap, "pass": 100 * gap <= 1.5}
    if "dit" in table:
        for key in ("heldout_loss", "fd_feature"):
            rel = mean(table, "dit", "B=3", key) / mean(table, "dit", "e2e", key) - 1
            out[f"dit: B=3 {key} vs e2e (relative) <= +10%"] = {"value": rel, "pass": rel <= 0.10}
        for key in ("fd_pixel", "fd_feature"):
            eq, un = mean(table, "dit", "B=3", key), mean(table, "dit", "B=3 uniform-log", key)
            out[f"dit: equal-mass {key} < uniform-log"] = {"value": [eq, un], "pass": eq < un}
    return out


def markdown(report: dict) -> str:
    lines = [f"# DiffusionBlocks vs end-to-end, every family ({'quick' if report['quick'] else 'full'} run)", ""]
    by_family = ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["wall_seconds_by_family"].items())
    lines += [
        f"Command: `{report['command']}`  ",
        f"Wall time: {report['wall_seconds'] / 60:.1f} min on {report['machine']['cpus']} CPUs "
        f"(families run: {by_family}); seeds {report['seeds']}; mean +- std over seeds.",
        "",
    ]
    labels = {row.key: row.label for fam in REGISTRY.values() for row in fam.rows}
    labels.update(
        val_ce_next_head="val CE of the plain next-token head (mixed)", train_seconds="train time (s, 1 thread)"
    )
    for fam, models in report["table"].items():
        spec = report["families"][fam]
        batch = merge(TRAIN, spec["base"].get("train", {}))["batch_size"]
        lines += [
            f"## {fam}",
            "",
            f"{spec['steps']} steps per block and for the baseline, batch {batch}; "
            f"model `{json.dumps(spec['base']['model'])}`.",
            "",
        ]
        keys = [k for k in spec["metrics"] + ["train_seconds"] if any(k in m for m in models.values())]
        lines.append("| model | " + " | ".join(labels.get(k, k) for k in keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for model, cell in models.items():
            vals = [f"{cell[k]['mean']:.4g} +- {cell[k]['std']:.2g}" if k in cell else "-" for k in keys]
            n = len(cell["train_seconds"]["values"])
            shown = model if n == len(report["seeds"]) else f"{model} ({n} seed{'s' * (n > 1)})"
            lines.append(f"| {shown} | " + " | ".join(vals) + " |")
        samples = [(m, c["sample_text"]) for m, c in models.items() if "sample_text" in c]
        for m, text in samples:
            lines += ["", f"Sample ({m}, seed {report['seeds'][0]}):", "", "```", text.strip()[:300], "```"]
        lines.append("")
    if report["checks"]:
        lines += ["## Acceptance checks", "", "| check | value | pass |", "|---|---|---|"]
        for k, v in report["checks"].items():
            val = v["value"]
            shown = ", ".join(f"{x:.4g}" for x in val) if isinstance(val, list) else f"{val:.4g}"
            lines.append(f"| {k} | {shown} | {'yes' if v['pass'] else '**no**'} |")
        lines.append("")
    if report.get("plot"):
        lines += [f"![B-trend]({Path(report['plot']).name})", ""]
    return "\n".join(lines)


def plot_b_trend(table: dict, path: Path) -> Path | None:
    """Held-out loss and feature FD of the DiT against B (B=1: the end-to-end model)."""
    if "dit" not in table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [("e2e", 1), ("B=2", 2), ("B=3", 3), ("B=4", 4), ("B=6", 6)]
    present = [(m, b) for m, b in models if m in table["dit"]]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(
        axes,
        ("heldout_loss", "fd_feature", "sample_accuracy"),
        ("held-out weighted loss", "classifier-feature FD", "sample accuracy"),
    ):
        xs = [b for _, b in present]
        ys = [table["dit"][m][key]["mean"] for m, _ in present]
        es = [table["dit"][m][key]["std"] for m, _ in present]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
        ax.set_xticks(xs)
        ax.set_xlabel("B (1 = end-to-end)")
        ax.set_title(label)
    fig.suptitle("DiT on digits, L=12: quality against the number of blocks (mean +- std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 seed, 30 steps, small sample counts (< 5 min)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override every family's steps")
    ap.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    seeds = list(range(QUICK["seeds"] if args.quick else args.seeds))
    torch.set_num_threads(1)

    steps_of = {f: args.steps or (QUICK["steps"] if args.quick else FAMILIES[f]["steps"]) for f in fams}
    tasks = []
    for fam in fams:
        shares = FAMILIES[fam].get("shares_first_blocks", {})  # variant -> the variant whose blocks it reuses
        overrides = {v[0]: v[1] for v in FAMILIES[fam]["variants"]}
        for name, over, baseline, *cap in FAMILIES[fam]["variants"]:
            if name in shares:
                continue
            for seed in seeds[: cap[0] if cap else None]:
                sibs = tuple(
                    (s, task_config(fam, overrides[s], seed, steps_of[fam], args.quick))
                    for s, host in shares.items()
                    if host == name
                )
                tasks.append((fam, name, task_config(fam, over, seed, steps_of[fam], args.quick), baseline, sibs))
    start = time.perf_counter()
    results = []
    print(f"quality: {len(tasks)} models on {args.workers} processes", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_evaluate, *t): t for t in tasks}
        for f in as_completed(futures):
            for r in f.result():
                results.append(r)
                m = r["metrics"]
                shown = {
                    k: round(v, 4)
                    for k, v in m.items()
                    if isinstance(v, float) and k in FAMILIES[r["family"]]["metrics"]
                }
                print(
                    f"[{time.perf_counter() - start:7.1f}s] {r['family']:9s} {r['model']:22s} seed {r['seed']}: "
                    f"{shown} (train {m['train_seconds']:.0f}s)",
                    flush=True,
                )
    table = summarise(results)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quality.json"
    previous = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    # A partial run (--families) replaces its own families' rows and keeps the others.
    merged_table = {**previous.get("table", {}), **table}
    command = " ".join(["python bench/quality.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    seconds = time.perf_counter() - start
    wall = {
        **previous.get("wall_seconds_by_family", {}),
        **{f: seconds * sum(r["family"] == f for r in results) / len(results) for f in fams},
    }
    report = {
        "command": command,
        "commands": {**previous.get("commands", {}), **{f: command for f in fams}},  # which run made each family's rows
        "quick": args.quick,
        "seeds": seeds,
        "wall_seconds_by_family": wall,
        "wall_seconds": sum(wall.values()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads_per_model": 1,
            "workers": args.workers,
        },
        "train": TRAIN,
        "families": {**previous.get("families", {}), **{f: {**FAMILIES[f], "steps": steps_of[f]} for f in fams}},
        "table": merged_table,
        "runs": [r for r in previous.get("runs", []) if r["family"] not in fams] + results,
    }
    report["checks"] = checks(merged_table)
    plot = plot_b_trend(merged_table, args.out / "quality_btrend.png")
    report["plot"] = str(plot) if plot else None
    path.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "quality.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
