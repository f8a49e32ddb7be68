"""The main job: plan, dispatch work units, watch the block workers, register, sample, evaluate.

1. Connect the services: Redis (``redis.url``, or an embedded redis-server), MLflow
   (``mlflow.tracking_uri``, or sqlite under ``output_dir``), Ray (``ray.address``, the cluster of
   ``ray job submit``, or a local Ray). An unreachable one fails here, in one line.
2. A new run: write the train split as parquet shards to storage, plan every block (sigma range,
   layers, seeds), cut each block's steps into work units, open the MLflow parent run and one
   child run per block, and write the manifest and all units to Redis in one transaction
   (``resume=<run id>`` instead reloads that run's manifest).
3. Start one worker per block (``workers.external`` blocks are left to ``python -m worker``),
   forward their metrics to MLflow, show progress, restart a failed block (only that one) up to
   ``workers.max_restarts`` times; it resumes from its own checkpoint.
4. Register each finished block as a version of ``<name>-block<b>`` (alias ``candidate``), load
   the set back from the registry in a sampler actor, evaluate it, log the sample grid, and
   promote the set to ``champion`` when it passes (``registry.champion_min_accuracy``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dblocks.config import ConfigError, RunConfig
from dblocks.build import eval_ranges, model_plans
from dblocks.data import load_digits_split
from dblocks.evaluate import passes
from dblocks.plan import BlockSpec, plan_hash
from dblocks.text import VOCAB_SIZE, load_text_split
from dblocks.seeds import derive_seed
from dblocks.units import make_units
from worker.block_worker import export_rel
from worker.shards import write_image_shards, write_text_shards
from worker.state import EmbeddedRedis, RunState
from worker.storage import Storage

from .launch import check_ray_address, make_launcher
from .progress import Progress
from .report import format_table, save_grid, write_metrics
from .tracking import Tracker, check_reachable

log = logging.getLogger(__name__)

MODELS = {"blocks": "DiffusionBlocks", "e2e": "end-to-end"}


class RunFailed(RuntimeError):
    pass


def prefix_of(cfg: RunConfig, model: str) -> str:
    return cfg.name if model == "blocks" else f"{cfg.name}-e2e"


def registered_name(cfg: RunConfig, model: str, index: int) -> str:
    return f"{prefix_of(cfg, model)}-block{index}"


def plan_id_of(cfg: RunConfig, plan: list[BlockSpec]) -> str:
    """What the blocks of a plan must agree on; training settings (steps, lr, ...) are not part of it."""
    return plan_hash(plan, model=asdict(cfg.model), noise=asdict(cfg.noise), seed=cfg.seed)


def default_tracking_uri(cfg: RunConfig) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(cfg.output_dir).resolve()}/mlflow.db"


def write_train_shards(cfg: RunConfig, storage: Storage) -> list:
    """The train split of the family's built-in data as parquet shards (kept if already written)."""
    if cfg.data.source == "text":
        seq_len = cfg.model.resolved().seq_len
        windows = load_text_split(seq_len, cfg.data.split_seed).train
        prefix = f"data/text-seq{seq_len}-split{cfg.data.split_seed}"
        return write_text_shards(storage, prefix, windows, cfg.data.shards, vocab_size=VOCAB_SIZE)
    data = load_digits_split(cfg.data.test_size, cfg.data.split_seed)
    prefix = f"data/digits-test{cfg.data.test_size}-split{cfg.data.split_seed}"
    return write_image_shards(storage, prefix, data.train_x, data.train_y, cfg.data.shards, num_classes=10)


def new_run(cfg: RunConfig, state: RunState, tracker: Tracker, storage: Storage) -> dict:
    run_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    shards = write_train_shards(cfg, storage)
    if cfg.train.batch_size > min(s.rows for s in shards):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: larger than a shard "
                          f"({min(s.rows for s in shards)} rows); use fewer data.shards")  # fmt: skip
    parent = tracker.start_run(run_id, {"dblocks.run_id": run_id}, system_metrics=True)
    tracker.log_params(parent, cfg.to_dict())
    jobs, units = {}, {}
    for model, plan in model_plans(cfg).items():
        plan_id = plan_id_of(cfg, plan)
        for spec in plan:
            job = f"{model}/{spec.index}"
            units[job] = make_units(cfg.train.steps, cfg.train.unit_steps, shards, derive_seed(cfg.seed, model), spec.index)
            child = tracker.start_run(job, {"block": spec.index, "num_blocks": spec.num_blocks, "plan_hash": plan_id}, parent)
            tracker.log_params(child, {**asdict(spec), "plan_hash": plan_id, "units": len(units[job])})
            jobs[job] = {"model": model, "spec": asdict(spec), "plan_id": plan_id, "units": len(units[job]),
                         "registered_model": registered_name(cfg, model, spec.index), "mlflow_run": child,
                         "external": model == "blocks" and spec.index in cfg.workers.external}  # fmt: skip
    manifest = {"run_id": run_id, "name": cfg.name, "created": time.time(), "config": cfg.to_dict(),
                "storage": storage.root, "shards": [asdict(s) for s in shards], "jobs": jobs,
                "mlflow": {"tracking_uri": tracker.uri, "parent": parent}, "registered": {}}  # fmt: skip
    state.create_run(manifest, units)
    tracker.log_dict(parent, manifest, "manifest.json")
    tracker.log_dict(parent, cfg.to_dict(), "config.json")
    return manifest


def resume_run(cfg: RunConfig, state: RunState, tracker: Tracker) -> dict:
    manifest = state.manifest(cfg.resume)
    for model, plan in model_plans(cfg).items():
        plan_id = plan_id_of(cfg, plan)
        theirs = manifest["jobs"].get(f"{model}/0", {}).get("plan_id")
        if theirs != plan_id:
            raise ConfigError(f"resume={cfg.resume}: this config's {model} plan ({plan_id}) is not the run's ({theirs}); "
                              "resume with the run's experiment and overrides")  # fmt: skip
    tracker.reopen(manifest["mlflow"]["parent"], system_metrics=True)
    return manifest


def watch(cfg: RunConfig, manifest: dict, state: RunState, tracker: Tracker, launcher, jobs: list[str]) -> None:
    """Run ``jobs`` to completion: submit, forward metrics, show progress, restart a failed block."""
    run = manifest["run_id"]
    done = {j for j in jobs if state.progress(run, j).get("state") == "done"}
    external = [j for j in jobs if manifest["jobs"][j]["external"]]
    for j in jobs:
        if j not in done and j not in external:
            launcher.submit(j)
    for j in external:
        if j not in done:
            log.info("%s is left to an external worker: python -m worker block=%s run=%s redis.url=%s",
                     j, j.split("/")[1], run, state.url)  # fmt: skip
    restarts = {j: 0 for j in jobs}
    cursors = {j: "0" for j in jobs}
    with Progress() as display:
        while True:
            for job, result, error in launcher.poll(timeout=1.0):
                if error is None:
                    done.add(job)
                    continue
                if restarts[job] >= cfg.workers.max_restarts:
                    raise RunFailed(f"{job} failed {restarts[job] + 1} times, last: {str(error).strip().splitlines()[-1][:300]}")
                restarts[job] += 1
                state.incr(run, job, "restarts")
                log.warning("%s failed (%s: %s); restart %d/%d from its checkpoint", job, type(error).__name__,
                            str(error).strip().splitlines()[-1][:200], restarts[job], cfg.workers.max_restarts)  # fmt: skip
                launcher.submit(job)
            progress = {j: state.progress(run, j) for j in jobs}
            done |= {j for j in external if progress[j].get("state") == "done"}
            for j in jobs:
                cursors[j], entries = state.read_metrics(run, j, cursors[j])
                for m in entries:
                    tracker.log_metrics(manifest["jobs"][j]["mlflow_run"], {k: v for k, v in m.items() if k != "step"}, m["step"])
            display.update(progress)
            if done >= set(jobs):
                return


def register(cfg: RunConfig, manifest: dict, state: RunState, tracker: Tracker, storage: Storage, jobs: list[str]) -> None:
    """Each finished block -> a new version of its registered model, alias ``candidate``."""
    for job in jobs:
        if job in manifest["registered"]:
            continue
        info = manifest["jobs"][job]
        spec = BlockSpec(**info["spec"])
        tags = {"block": spec.index, "num_blocks": spec.num_blocks, "sigma_lo": repr(spec.lo),
                "sigma_hi": repr(spec.hi), "plan_hash": info["plan_id"], "run_id": manifest["run_id"]}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.get_file(export_rel(manifest["run_id"], job), Path(tmp) / "block.safetensors")
            version = tracker.register_block(info["mlflow_run"], local, info["registered_model"], tags, "candidate")
        manifest["registered"][job] = version
        state.update_manifest(manifest)
        tracker.end(info["mlflow_run"], ok=True)
        log.info("registered %s version %s (alias candidate)", info["registered_model"], version)


def evaluate_sets(cfg: RunConfig, manifest: dict, tracker: Tracker, launcher, out: Path) -> dict:
    """Load each registered set back through a sampler actor, evaluate, log samples; promote to champion."""
    models = [m for m in MODELS if any(j["model"] == m for j in manifest["jobs"].values())]
    callers = launcher.samplers([(tracker.uri, prefix_of(cfg, m), "candidate") for m in models])
    pending = [c("evaluate", (cfg.to_dict(),)) for c in callers]
    results, parent = {}, manifest["mlflow"]["parent"]
    for m, res in zip(models, launcher.get(pending)):
        name = f"{MODELS[m]} B={cfg.blocks.num}" if m == "blocks" else MODELS[m]
        res = {k: torch.tensor(v) if hasattr(v, "__array__") and not isinstance(v, float) else v for k, v in res.items()}
        results[name] = res
        if "samples" in res:  # images: a 10 x 10 grid, row = digit
            shown = min(cfg.sample.per_class, 10)
            per_class = res["samples"].reshape(10, cfg.sample.per_class, *res["samples"].shape[1:])[:, :shown]
            shown_path = save_grid(per_class.flatten(0, 1), out / m / "samples.png", columns=shown)
        elif "sample_text" in res:
            shown_path = out / m / "sample.txt"
            shown_path.parent.mkdir(parents=True, exist_ok=True)
            shown_path.write_text(res["sample_text"])
        else:
            shown_path = None
        if shown_path is not None:
            tracker.log_artifact(parent, shown_path, f"samples/{m}")
        tracker.log_metrics(parent, {f"{m}/{k}": v for k, v in res.items() if isinstance(v, float)}, step=0)
        res["champion"] = passed = passes(cfg, res)
        jobs = [j for j, info in manifest["jobs"].items() if info["model"] == m]
        if passed:
            for j in jobs:
                tracker.set_alias(manifest["jobs"][j]["registered_model"], "champion", manifest["registered"][j])
        log.info("%s: %s%s", name, "" if shown_path is None else f"samples {shown_path}; ",
                 "promoted to champion" if passed else "stays candidate (below the registry.champion_* threshold)")  # fmt: skip
    return results


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its file (never in the working directory)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


@contextlib.contextmanager
def services(cfg: RunConfig, out: Path):
    """(state, tracker, storage), connected in that order after a check of every address."""
    uri = default_tracking_uri(cfg)
    check_reachable(uri)
    if cfg.ray.address and cfg.ray.address != "auto":
        check_ray_address(cfg.ray.address)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation chatter
    with contextlib.ExitStack() as stack:
        embedded = None
        if cfg.redis.url is None:
            embedded = stack.enter_context(EmbeddedRedis(out / "redis"))
        state = RunState(cfg.redis.url or embedded.url)
        tracker = Tracker(uri, cfg.mlflow.experiment or cfg.name, artifact_location(uri))
        yield state, tracker, Storage(cfg.storage.path or str((out / "storage").resolve()))


def run(cfg: RunConfig, *, only: list[str] | None = None) -> dict:
    """The whole run (``only``: train and register just these jobs, e.g. ``["blocks/1"]``)."""
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with services(cfg, out) as (state, tracker, storage), contextlib.ExitStack() as stack:
        manifest = resume_run(cfg, state, tracker) if cfg.resume else new_run(cfg, state, tracker, storage)
        launcher = make_launcher(cfg)
        stack.callback(launcher.shutdown)
        run_id = manifest["run_id"]
        (out / "last_run").write_text(f"{run_id}\n{state.url}\n")
        log.info("run %s: Redis %s, MLflow %s, storage %s", run_id, state.url, tracker.uri, storage.root)
        launcher.attach(state.url, run_id)
        jobs = only or list(manifest["jobs"])
        unknown = sorted(set(jobs) - set(manifest["jobs"]))
        if unknown:
            raise ConfigError(f"{unknown[0]}: run {run_id} has only {', '.join(manifest['jobs'])}")
        for job in jobs:
            s = manifest["jobs"][job]["spec"]
            log.info("plan: %s layers [%d, %d) sigma [%.4g, %.4g] (training [%.4g, %.4g]), %d units",
                     job, s["layer_start"], s["layer_end"], s["lo"], s["hi"], s["train_lo"], s["train_hi"],
                     manifest["jobs"][job]["units"])  # fmt: skip
        ok = False
        try:
            t0 = time.perf_counter()
            watch(cfg, manifest, state, tracker, launcher, jobs)
            train_seconds = time.perf_counter() - t0
            register(cfg, manifest, state, tracker, storage, jobs)
            results = {}
            if set(manifest["registered"]) == set(manifest["jobs"]):
                results = evaluate_sets(cfg, manifest, tracker, launcher, out)
                sampling = f"guidance {cfg.sample.guidance}, {cfg.sample.steps} Euler grid points, " if cfg.model.family == "dit" else ""
                print(f"\nrun {run_id} ({cfg.model.family}): {sampling}{cfg.train.steps} steps per block")
                print(format_table(results, eval_ranges(cfg), cfg.model.family))
                path = write_metrics(results, out / "metrics.json", run_id=run_id, config=cfg.to_dict(),
                                     train_seconds=train_seconds, wall_seconds=time.perf_counter() - t_start,
                                     registered=manifest["registered"])  # fmt: skip
                tracker.log_artifact(manifest["mlflow"]["parent"], path)
            ok = True
            return results
        finally:
            tracker.end(manifest["mlflow"]["parent"], ok=ok)
