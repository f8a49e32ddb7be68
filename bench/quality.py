"""Quality of DiffusionBlocks vs end-to-end training, every family, side by side in one run.

For each family, the paper's B (DiT and ViT 3, AR 4, MDM 3; the recurrent core is one block)
against the end-to-end baseline of the same total depth, each over ``--seeds`` seeds (mean +-
std; the DiT ablations other than the partition one over the first ABLATION_SEEDS of them).
Budget rule, the same for both sides: every block and the baseline take ``steps`` optimizer steps
at the same batch size, learning rate, warm-up and EMA (matched layer-compute: the B blocks
together cost about one end-to-end model). Nothing is tuned per side.

Rows
  dit        held-out weighted denoising loss, pixel FD, classifier-feature FD, sample accuracy;
             ablations: equal-mass vs uniform-log partition, with vs without w(sigma), B in {1,2,3,4,6};
             guidance 2.0 (the paper's) beside 1.5, on the same trained B=3 blocks
  vit        test accuracy (B-step inference: one call per block); train.ce_weighting=batch_mean (the
             official code's mean(w) mean(CE)); the official readout order (LayerNorm before the skip)
  ar         validation CE of the next-token prediction at sigma_min (after the B-step chain), CE at
             sigma_max, next-char accuracy; pure and mixed objectives; batch_mean; sample text
  mdm        test bits per character (MD4 ELBO); overlap gamma 0.05 (the paper's) beside 0; sample text
  recurrent  validation loss after K iterations: single-pass diffusion core vs truncated BPTT; batch_mean

The AR and recurrent models are also judged by their samples (dblocks/judge.py): continuations of
held-out prompts under a fixed judge LM (trained once, cached in ``--judge-cache``), generative
perplexity beside unigram entropy and distinct-4, for every decoding (end-to-end: argmax,
temperature 1, top-p 0.95; the chain: sampled, and its deterministic variant from z = 0) and for
the held-out text itself; next-char accuracy per decoding, so argmax meets argmax, sampled sampled.

Training runs in-process through the library (``make_trainer`` + ``BlockTrainer.step``, the code
the workers run), one model per task on a pool of single-threaded processes; the distributed path
is measured in bench/scaling.py and tested in tests/test_distributed.py.

    python bench/quality.py                 # the full run (~80 min on 2 cores; the judge trains once) -> bench/results/
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
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dblocks.build import build_block, make_trainer, plan_for  # noqa: E402
from dblocks.config import RunConfig  # noqa: E402
from dblocks.data import BatchStream, digits_data, load_digits_split  # noqa: E402
from dblocks.families import FAMILIES as REGISTRY  # noqa: E402
from dblocks.families.base import effective_batch  # noqa: E402
from dblocks.judge import JudgeConfig, load_judge, sample_metrics  # noqa: E402
from dblocks.seeds import derive_seed  # noqa: E402
from dblocks.text import load_text_split, shakespeare_data  # noqa: E402
from worker.config import load_run_config  # noqa: E402

# family -> base config (the same for both sides), the paper's B, and the variants compared.
# A variant: (name, config overrides, baseline?[, at most this many seeds]). "e2e" is always the
# end-to-end baseline. The DiT ablations beyond the partition check, and issue 15's settings
# (batch_mean, readout order, MDM gamma), run on the first ABLATION_SEEDS seeds only.
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
            ("B=3 guidance 2.0", {"sample": {"guidance": 2.0}}, False),  # sampling only: B=3's blocks
            ("B=3 without w(sigma)", {"train": {"loss_weighting": False}}, False, ABLATION_SEEDS),
            ("B=2", {"blocks": {"num": 2}}, False, ABLATION_SEEDS),
            ("B=4", {"blocks": {"num": 4}}, False, ABLATION_SEEDS),
            ("B=6", {"blocks": {"num": 6}}, False, ABLATION_SEEDS),
        ],
        "shares_all_blocks": {"B=3 guidance 2.0": "B=3"},  # guidance changes sampling only
        "metrics": ["heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy"],
    },
    "vit": {
        "base": {"name": "q-vit", "model": {"family": "vit", "size": "tiny", "layers": 12}},  # the paper's depth
        "B": 3,
        "steps": 1000,
        "variants": [
            ("e2e", {}, True),
            ("B=3", {}, False),
            ("B=3 batch_mean", {"train": {"ce_weighting": "batch_mean"}}, False, ABLATION_SEEDS),
            ("B=3 official readout", {"model": {"readout": "norm_then_skip"}}, False, ABLATION_SEEDS),
        ],
        "metrics": ["test_accuracy", "effective_batch"],
    },
    "ar": {
        "base": text_base("ar", blocks={"gamma": 0.1}),
        "B": 4,
        "steps": 600,
        "variants": [
            ("e2e", {}, True),
            ("B=4 pure", {}, False),
            ("B=4 mixed", {"model": {"mixed": True}}, False),
            ("B=4 batch_mean", {"train": {"ce_weighting": "batch_mean"}}, False, ABLATION_SEEDS),
        ],
        "shares_first_blocks": {"B=4 mixed": "B=4 pure"},  # the mixed head changes the last block only
        "metrics": ["val_ce", "val_ce_sigma_max", "val_accuracy", "val_ce_next_head", "effective_batch"],
        "judged": True,
    },
    "mdm": {
        "base": text_base("mdm", blocks={"gamma": 0.0}),
        "B": 3,
        "steps": 1000,
        "variants": [
            ("e2e", {}, True),
            ("B=3", {}, False),
            ("B=3 gamma 0.05", {"blocks": {"gamma": 0.05}}, False, ABLATION_SEEDS),
        ],
        "metrics": ["test_bpc"],
    },
    "recurrent": {
        "base": text_base("recurrent"),
        "B": 1,
        "steps": 1000,
        "variants": [
            ("e2e", {}, True),
            ("diffusion core", {}, False),
            ("diffusion core batch_mean", {"train": {"ce_weighting": "batch_mean"}}, False, ABLATION_SEEDS),
        ],
        "metrics": ["val_loss", "val_bpc", "val_accuracy", "val_loss_first_call", "effective_batch"],
        "judged": True,
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


class Trained(NamedTuple):
    net: torch.nn.Module  # the EMA weights
    loss: float  # mean of the last 50 training losses
    seconds: float
    effective_batch: float  # mean over steps of (sum w)^2 / sum w^2, as the worker logs it


def train_block(cfg: RunConfig, spec, baseline: bool, rows: tuple) -> Trained:
    """One block (or the baseline) for ``cfg.train.steps`` steps."""
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, spec, baseline=baseline)
    stream = BatchStream(len(rows[0]), cfg.train.batch_size, derive_seed(cfg.seed, "batches", spec.index, baseline))
    steps = [trainer.step(tuple(c[stream.indices(step)] for c in rows)) for step in range(cfg.train.steps)]
    ess = statistics.fmean(effective_batch(trainer.loss_fn.weight(s["sigma"])) for s in steps)
    loss = statistics.fmean(s["loss"] for s in steps[-50:])
    return Trained(trainer.ema.eval(), loss, time.perf_counter() - t0, ess)


JUDGE_PROMPT = 16  # characters of each held-out prompt; the rest of a judge-length window is the reference


def judge_config(quick: bool) -> JudgeConfig:
    return JudgeConfig(steps=60) if quick else JudgeConfig()


def judge_cache(judge_dir: Path, quick: bool):
    """The judge (trained on the first call, then loaded from ``judge_dir``)."""
    jcfg = judge_config(quick)
    return load_judge(load_text_split(jcfg.model.seq_len).train, judge_dir, jcfg)


def judged(cfg: RunConfig, plan, nets, baseline: bool, judge_dir: Path, quick: bool) -> dict:
    """The sample-based metrics of a text model under the judge (dblocks/judge.py)."""
    judge = judge_cache(judge_dir, quick)
    data = shakespeare_data()
    n = 16 if quick else 64
    (held_out,) = data.split("test", seq_len=judge.cfg.model.seq_len, limit=n)
    (val,) = data.split("validation", seq_len=cfg.seq_len, limit=4 * n)
    decoders = cfg.family.decoders(nets, plan, cfg, baseline=baseline)
    return sample_metrics(judge, decoders, held_out, val, seq_len=cfg.seq_len, prompt_chars=JUDGE_PROMPT, seed=cfg.seed)


def train_and_evaluate(
    family: str,
    name: str,
    cfg_dict: dict,
    baseline: bool,
    siblings: tuple = (),
    judge_dir: Path | None = None,
    quick: bool = False,
) -> list[dict]:
    """One model (all B blocks one after another, or the baseline), trained and evaluated here.

    ``siblings``: (name, config, shared) of variants that share this one's blocks: ``"first"``, its
    first B-1 blocks (they differ in the LAST block only: the AR mixed head) -- the same
    construction, seeds and batches, so training them again would give the same tensors (checked
    on the initial weights) -- and train only their own last block; ``"all"``, every block (they
    differ in sampling only: the DiT's guidance). Their train_seconds include the shared blocks'
    time. ``judge_dir``: also judge the model's samples (dblocks/judge.py), the judge cached there.
    """
    torch.set_num_threads(1)
    cfg = load_run_config(cfg_dict)
    plan = plan_for(cfg, 1 if baseline else cfg.blocks.num)
    rows = batches(cfg.data.source, cfg.seq_len)
    trained = [train_block(cfg, spec, baseline, rows) for spec in plan]
    models = [(name, cfg, trained)]
    for sib_name, sib_dict, shared in siblings:
        sib = load_run_config(sib_dict)
        if plan_for(sib, sib.blocks.num) != plan:
            raise ValueError(f"{sib_name}: its block plan differs from {name}'s; it cannot share blocks")
        own = len(plan) - 1 if shared == "first" else len(plan)
        training = [{k: v for k, v in c.to_dict().items() if k != "sample"} for c in (cfg, sib)]
        if shared == "all" and training[0] != training[1]:
            raise ValueError(f"{sib_name}: it trains differently from {name}; it cannot share every block")
        for spec in plan[:own]:
            a, b = (build_block(c, spec).state_dict() for c in (cfg, sib))
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                raise ValueError(f"{sib_name}: block {spec.index} differs from {name}'s; it cannot share blocks")
        models.append((sib_name, sib, trained[:own] + [train_block(sib, s, False, rows) for s in plan[own:]]))
    results = []
    for model_name, model_cfg, blocks in models:
        nets = [b.net for b in blocks]
        t1 = time.perf_counter()
        res = model_cfg.family.evaluate(nets, plan, model_cfg, HELD_OUT[cfg.data.source](), baseline=baseline)
        if judge_dir is not None:
            res.update(judged(model_cfg, plan, nets, baseline, judge_dir, quick))
        out = {k: v for k, v in res.items() if isinstance(v, (float, int, str)) and not isinstance(v, bool)}
        out.update(
            train_seconds=sum(b.seconds for b in blocks),
            eval_seconds=time.perf_counter() - t1,
            final_train_loss=[b.loss for b in blocks],
            effective_batch=blocks[-1].effective_batch,  # the lowest-noise block: the most uneven w(sigma)
            effective_batch_per_block=[b.effective_batch for b in blocks],
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


JUDGED = ("judge_ppl", "entropy", "distinct4", "accuracy")  # per decoding, from dblocks.judge.sample_metrics
DECODINGS = {  # decoding key -> how (the end-to-end model, the DiffusionBlocks chain) decode with it
    "argmax": ("argmax", "chain from z = 0, argmax"),
    "sampled": ("temperature 1", "chain from z ~ N(0, sigma_max^2), argmax"),
    "top_p": ("top-p 0.95", "-"),
}


def judged_table(models: dict) -> list[str]:
    """The judged samples of a text family: one row per (model, decoding), the held-out text first."""
    first = next((c for c in models.values() if "judge_ppl_text" in c), None)
    if first is None:
        return []
    cell = lambda c, k: f"{c[k]['mean']:.4g} +- {c[k]['std']:.2g}" if k in c else "-"  # noqa: E731
    lines = [
        "",
        "Judged samples: continuations of held-out prompts under the judge LM (dblocks/judge.py); "
        "generative perplexity is only meaningful beside the entropy; accuracy is teacher-forced, "
        "like for like per decoding.",
        "",
        "| model | decoding | judge perplexity | unigram entropy (bits) | distinct-4 | next-char accuracy |",
        "|---|---|---|---|---|---|",
        "| held-out text | - | " + " | ".join(cell(first, f"{k}_text") for k in JUDGED[:3]) + " | - |",
    ]
    for model, c in models.items():
        for d, how in DECODINGS.items():
            if f"judge_ppl_{d}" in c:
                shown = how[0] if model == "e2e" else how[1]
                lines.append(f"| {model} | {shown} | " + " | ".join(cell(c, f"{k}_{d}") for k in JUDGED) + " |")
    return lines


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
        val_ce_next_head="val CE of the plain next-token head (mixed)",
        train_seconds="train time (s, 1 thread)",
        effective_batch="effective batch (sum w)^2/sum w^2, lowest-noise block",
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
        lines += judged_table(models)
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
    ap.add_argument(
        "--judge-cache", type=Path, default=ROOT / "outputs" / "judge", help="where the text judge is cached"
    )
    args = ap.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    seeds = list(range(QUICK["seeds"] if args.quick else args.seeds))
    torch.set_num_threads(1)

    steps_of = {f: args.steps or (QUICK["steps"] if args.quick else FAMILIES[f]["steps"]) for f in fams}
    start = time.perf_counter()
    if any(FAMILIES[f].get("judged") for f in fams):  # trained once here (or loaded), before the pool loads it
        judge = judge_cache(args.judge_cache, args.quick)
        print(f"judge: {'trained' if judge.trained else 'loaded'} {judge.path}", flush=True)
    tasks = []
    for fam in fams:
        # variant -> (the variant whose blocks it reuses, which of them)
        shares = {s: (host, "first") for s, host in FAMILIES[fam].get("shares_first_blocks", {}).items()}
        shares.update({s: (host, "all") for s, host in FAMILIES[fam].get("shares_all_blocks", {}).items()})
        overrides = {v[0]: v[1] for v in FAMILIES[fam]["variants"]}
        judge_dir = args.judge_cache if FAMILIES[fam].get("judged") else None
        for name, over, baseline, *cap in FAMILIES[fam]["variants"]:
            if name in shares:
                continue
            for seed in seeds[: cap[0] if cap else None]:
                sibs = tuple(
                    (s, task_config(fam, overrides[s], seed, steps_of[fam], args.quick), shared)
                    for s, (host, shared) in shares.items()
                    if host == name
                )
                cfg = task_config(fam, over, seed, steps_of[fam], args.quick)
                tasks.append((fam, name, cfg, baseline, sibs, judge_dir, args.quick))
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
