"""The main job: plan, dispatch work units, watch the block workers, register, sample, evaluate.

1. Connect the services: the run store (``redis.url``, or an embedded redis-server; ``memory://``
   with ``workers.backend=inline`` keeps it in this process), MLflow (``mlflow.tracking_uri``, or
   sqlite under ``output_dir``), Ray (``ray.address``, the cluster of ``ray job submit``, or a local
   Ray). An unreachable one fails here, in one line.
2. Open the data (``data.path``, or the built-in set prepared into storage on first use), check
   every shard against its card, and take the model's input shape, classes or vocabulary from it.
   A new run: plan every block (level range,
   layers, seeds), cut each block's steps into work units, open the MLflow parent run and one
   child run per block, and write the manifest and all units to the store in one transaction
   (``resume=<run id>`` instead reloads that run's manifest).
3. The controller (coordinator/controller.py) starts one worker per block (``workers.external``
   blocks are left to ``python -m worker``), forwards their metrics to MLflow, shows progress, and
   restarts a failed or silent block (only that one) up to ``workers.max_restarts`` times; it
   resumes from its own checkpoint. A block that fails for good does not stop the others: they
   finish and are registered, and the run ends "partial" (``RunPartial``: one line naming the
   failed block, why, and the ``resume=`` command that continues it).
4. Register each finished block as a version of ``<name>-block<b>`` (alias ``candidate``), load
   the set back from the registry in a sampler, evaluate it, log the samples, and promote the set
   to ``champion`` when it passes the family's headline threshold (``registry.champion_threshold``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dblocks.build import model_plans
from dblocks.config import ConfigError, RunConfig
from dblocks.errors import one_line
from dblocks.plan import BlockSpec, plan_hash
from dblocks.seeds import derive_seed
from dblocks.units import Shard, make_units
from worker.block_worker import export_rel
from worker.config import load_run_config
from worker.dataset import CARD, Dataset, open_dataset
from worker.record import MODEL_NAMES, Job, JobId, Manifest
from worker.redaction import redact, redact_config
from worker.storage import Storage
from worker.store import RunStore, open_store

from .controller import Controller
from .data import PrepareConfig, prepare
from .forwarding import QueuedTracker
from .lock import OutputLock, RunLease
from .policy import BlocksFailed, FailurePolicy, Interrupted, RunFailed, RunPartial
from .preview import Previewer
from .progress import Progress
from .redis_server import EmbeddedRedis
from .report import format_table, plot_loss_vs_sigma, show_samples, write_metrics
from .tracking import MlflowTracker, Tracker, TrackingError, check_reachable, runs_url
from .workers import WorkerGroup, check_ray_address, make_workers

log = logging.getLogger(__name__)


def prefix_of(cfg: RunConfig, model: str) -> str:
    return cfg.name if model == "blocks" else f"{cfg.name}-{model}"


def registered_name(cfg: RunConfig, job: JobId) -> str:
    return f"{prefix_of(cfg, job.model)}-block{job.index}"


def plan_hash_of(cfg: RunConfig, plan: list[BlockSpec]) -> str:
    """What the blocks of a plan must agree on; training settings (steps, lr, ...) are not part of it."""
    return plan_hash(plan, model=asdict(cfg.model), noise=asdict(cfg.noise), seed=cfg.seed)


def default_tracking_uri(cfg: RunConfig) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(cfg.output_dir).resolve()}/mlflow.db"


BUILTIN_INPUTS = {"digits": "builtin:digits", "text": "builtin:shakespeare"}  # data.source -> dblocks-data input


def open_data(cfg: RunConfig, storage: Storage) -> tuple[RunConfig, Dataset]:
    """The run's dataset, checked against its card, and the config with what the data decides.

    ``data.path`` names a prepared dataset; without one the built-in set is prepared into the run's
    storage (``data/builtin-<source>``) by the same code as ``dblocks-data``, once (a run that finds
    its card there prepares nothing). Every shard's content hash is checked here, before any
    training. The model's input shape, classes or vocabulary are set from the card
    (``Family.data_fields``); an override that disagrees is refused."""
    if cfg.data.path is None:
        source = cfg.data.source.value
        out = storage.uri(f"data/builtin-{source}")
        if not Storage(out).exists(CARD):
            prepare(PrepareConfig(input=BUILTIN_INPUTS[source], output=out))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=out))
    data = open_dataset(cfg.data.path)
    data.verify()
    fields = cfg.family.data_fields(data.card, cfg)
    for key, value in fields.items():
        mine = getattr(cfg.model, key)
        if mine is not None and mine != value:
            raise ConfigError(
                f"model.{key}={mine}: {cfg.data.name} has {key} {value} ({data.card.describe()}); remove the override"
            )
    try:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))
    except ConfigError as e:
        raise ConfigError(f"{cfg.data.name} ({data.card.describe()}) does not fit the model: {e}") from None
    return cfg, data


def train_shards(cfg: RunConfig, data: Dataset) -> list[Shard]:
    """The train split's shards, with their training rows (text: the model's windows)."""
    shards, batch = data.train_shards(cfg.seq_len), cfg.train.batch_size
    rows = sum(s.rows for s in shards)
    if rows < batch:
        raise ConfigError(
            f"train.batch_size={batch}: {cfg.data.name} has only {rows} training rows; use a smaller batch"
        )
    small = min(shards, key=lambda s: s.rows)
    if small.rows < batch:
        raise ConfigError(
            f"train.batch_size={batch}: larger than shard {data.storage.uri(small.path)} ({small.rows} rows); "
            "use a smaller batch, or prepare the data with fewer, larger shards (shards=K)"
        )
    return shards


def new_run(cfg: RunConfig, store: RunStore, tracker: Tracker, storage: Storage, data: Dataset) -> Manifest:
    """A new run over ``data`` (``cfg`` as ``open_data`` returned it)."""
    run_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    shards = train_shards(cfg, data)
    parent = tracker.start_run(run_id, {"dblocks.run_id": run_id}, system_metrics=True)
    tracker.log_params(parent, cfg.params())
    jobs, units = {}, {}
    for model, plan in model_plans(cfg).items():
        hash_ = plan_hash_of(cfg, plan)
        for spec in plan:
            job = JobId(model, spec.index)
            seed = derive_seed(cfg.seed, model)
            units[job] = make_units(cfg.train.steps, cfg.train.unit_steps, shards, seed, spec.index)
            tags = {"block": spec.index, "num_blocks": spec.num_blocks, "plan_hash": hash_, **data_tags(data)}
            child = tracker.start_run(str(job), tags, parent)
            tracker.log_params(child, {**asdict(spec), "plan_hash": hash_, "units": len(units[job])})
            external = not job.baseline and spec.index in cfg.workers.external
            jobs[job] = Job(job, spec, hash_, len(units[job]), registered_name(cfg, job), child, external)
    config = redact_config(cfg.to_dict())  # the run store may be read by anyone who can read its AOF
    manifest = Manifest(run_id, cfg.name, time.time(), config, storage.root, shards, jobs, tracker.uri, parent)
    store.create_run(manifest, units)
    tracker.log_dict(parent, manifest_dict(manifest), "manifest.json")
    tracker.log_dict(parent, cfg.to_dict(), "config.json")
    return manifest


def data_tags(data: Dataset) -> dict:
    """What the registry and MLflow record of the data a block was trained on."""
    return {"data_uri": data.root, "data_hash": data.card.content_hash}


def manifest_dict(manifest: Manifest) -> dict:
    return json.loads(manifest.to_json())


# What a resumed run may change: where things run and are tracked, not what is trained.
RESUMABLE = ("resume", "output_dir", "redis", "mlflow", "ray", "storage", "workers", "sample", "registry")
RESUMABLE += ("train.threads", "train.device", "train.keep_checkpoints")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_settings(cfg: RunConfig, manifest: Manifest) -> None:
    """``resume=<run id>`` continues the run as it was started: a training setting (``train.steps``,
    ``train.lr``, ``seed``, ...) that differs from the run's is refused in one line naming the key.
    Keys the run's manifest does not hold (a run from an older version) are not compared."""
    ours = _leaves(json.loads(json.dumps(redact_config(cfg.to_dict()))))
    theirs = _leaves(manifest.config)
    for key in sorted(ours.keys() & theirs.keys()):
        if any(key == k or key.startswith(f"{k}.") for k in RESUMABLE) or ours[key] == theirs[key]:
            continue
        raise ConfigError(
            f"{key}={ours[key]}: run {manifest.run_id} was started with {key}={theirs[key]}; "
            "a resumed run keeps its training settings: drop the override or set it back"
        )


def resume_run(cfg: RunConfig, store: RunStore, tracker: Tracker) -> Manifest:
    manifest = store.manifest(cfg.resume)
    for model, plan in model_plans(cfg).items():
        ours = plan_hash_of(cfg, plan)
        first = manifest.jobs.get(JobId(model, 0))
        theirs = first.plan_hash if first else None
        if theirs != ours:
            raise ConfigError(
                f"resume={cfg.resume}: this config's {model} plan ({ours}) is not the run's ({theirs}); "
                "resume with the run's experiment and overrides"
            )
    tracker.reopen(manifest.parent_run, system_metrics=True)
    return manifest


def train(
    cfg: RunConfig,
    manifest: Manifest,
    store: RunStore,
    tracker: Tracker,
    workers: WorkerGroup,
    jobs: list[JobId],
    previewer: Previewer | None = None,
) -> dict[JobId, RunFailed]:
    """Run ``jobs`` to completion under the controller, with the progress display (and the previews).
    Returns the jobs that failed for good (job -> why), once every other job has finished."""
    policy = FailurePolicy(
        cfg.workers.max_restarts, cfg.workers.lease_seconds, schedule_timeout=cfg.workers.schedule_timeout
    )

    with Progress() as display:

        def show(progress: dict) -> None:
            display.update(progress)
            if previewer is not None:
                previewer.update(progress)

        try:
            Controller(manifest, store, workers, tracker, policy, jobs, on_progress=show).run()
        except BlocksFailed as e:
            return e.failures
        finally:
            if previewer is not None:
                previewer.close()
    return {}


def end_partial(manifest: Manifest, tracker: Tracker, failed: dict[JobId, RunFailed], out: Path, **extra) -> RunPartial:
    """The end of a run some of whose blocks failed for good (the finished ones are registered): their
    child runs FAILED, ``metrics.json`` (logged to the parent run) and ``last_run`` saying "partial",
    which block failed and why; returns the one-line error with the command that continues the run."""
    run_id = manifest.run_id
    for job in failed:
        tracker.end(manifest.job(job).mlflow_run, ok=False)
    why = ", ".join(f"{job} failed ({f.reason})" for job, f in failed.items())
    how = "partial" if manifest.registered else "failed"
    again = f"python -m coordinator resume={run_id} <the run's overrides>"
    failures = {str(j): f.reason for j, f in failed.items()}
    registered = {str(j): v for j, v in manifest.registered.items()}
    path = write_metrics(
        {},
        out / "metrics.json",
        run_id=run_id,
        status=how,
        failed=failures,
        registered=registered,
        resume=again,
        **extra,
    )
    tracker.log_artifact(manifest.parent_run, path)
    last = (out / "last_run").read_text().splitlines()[:2] if (out / "last_run").is_file() else [run_id]
    (out / "last_run").write_text("\n".join([*last, f"{how}: {why}"]) + "\n")
    return RunPartial(f"run {run_id} ended {how}: {why}; fix it and continue with: {again}")


def describe_block(info, manifest: Manifest, data: Dataset, space: str) -> str:
    """A registered version's description: what the block is, its range (in the family's level
    ``space``: sigma, or MDM's t), plan, data, and how to load it."""
    s, space = info.spec, {"sigma": "σ"}.get(space, space)
    what = (
        f"DiffusionBlocks block {s.index} of {s.num_blocks}: layers [{s.layer_start}, {s.layer_end}), a denoiser "
        f"trained alone on its {space} range [{s.lo:.4g}, {s.hi:.4g}] (training [{s.train_lo:.4g}, {s.train_hi:.4g}])"
        if not info.id.baseline
        else f"The end-to-end baseline ({s.layer_end - s.layer_start} layers), trained by backpropagation"
    )
    return (
        f"{what}. Run {manifest.run_id}, plan {info.plan_hash}, data {data.card.describe()} "
        f"(content hash {data.card.content_hash[:12]}). Load: "
        f"mlflow.pyfunc.load_model('models:/{info.registered_model}@champion'); predict({{'z': ..., 'sigma': ..., "
        "**cond}) is the block's denoiser, .unwrap_python_model().net the network; python -m coordinator.sample "
        "alias=champion chains the set."
    )


def register(
    manifest: Manifest, store: RunStore, tracker: Tracker, storage: Storage, jobs: list[JobId], data: Dataset
) -> None:
    """Each finished block -> a new version of its registered model, alias ``candidate``, tagged with
    its plan and the dataset it was trained on (URI and content hash)."""
    space = load_run_config(manifest.config).levels.space
    for job in jobs:
        if job in manifest.registered:
            continue
        info = manifest.job(job)
        spec = info.spec
        tags = {
            "block": spec.index,
            "num_blocks": spec.num_blocks,
            "lo": repr(spec.lo),  # the inference range, not the widened training range
            "hi": repr(spec.hi),
            "plan_hash": info.plan_hash,
            "run_id": manifest.run_id,
            **data_tags(data),
        }
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.get_file(export_rel(manifest.run_id, job), Path(tmp) / "block.safetensors")
            about = describe_block(info, manifest, data, space)
            version = tracker.register_block(info.mlflow_run, local, info.registered_model, tags, "candidate", about)
        manifest.registered[job] = version
        store.update_manifest(manifest)
        tracker.end(info.mlflow_run, ok=True)
        log.info("registered %s version %s (alias candidate)", info.registered_model, version)


def result_name(cfg: RunConfig, model: str) -> str:
    return f"{MODEL_NAMES[model]} B={cfg.blocks.num}" if model == "blocks" else MODEL_NAMES[model]


def as_tensor(v):
    """An array a sampler actor returned (numpy) back as a tensor; floats and text stay as they are."""
    return torch.tensor(v) if hasattr(v, "__array__") and not isinstance(v, float) else v


def evaluate_sets(cfg: RunConfig, manifest: Manifest, tracker: Tracker, workers: WorkerGroup, out: Path) -> dict:
    """Load each registered set back through a sampler, evaluate, log samples; promote to champion."""
    models = manifest.models
    callers = workers.samplers([(tracker.uri, prefix_of(cfg, m), "candidate") for m in models])
    pending = [c("evaluate", (cfg.to_dict(),)) for c in callers]
    results, parent = {}, manifest.parent_run
    for m, res in zip(models, workers.get(pending)):
        name = result_name(cfg, m)
        res = {k: as_tensor(v) for k, v in res.items()}
        results[name] = res
        shown = show_samples(cfg, res, out / m)
        if shown is not None:
            tracker.log_artifact(parent, shown, f"samples/{m}")
        tracker.log_metrics(parent, {f"{m}/{k}": v for k, v in res.items() if isinstance(v, float)}, step=0)
        res["champion"] = passed = cfg.family.passes(res, cfg)
        if passed:
            for job in manifest.jobs_of(m):
                tracker.set_alias(job.registered_model, "champion", manifest.registered[job.id])
        where = "" if shown is None else f"samples {shown}; "
        verdict = "promoted to champion" if passed else "stays candidate (below registry.champion_threshold)"
        log.info("%s: %s%s", name, where, verdict)
    ranges = [(s.lo, s.hi) for s in (j.spec for j in manifest.jobs_of("blocks"))]
    curve = plot_loss_vs_sigma(results, ranges, out / "loss_vs_sigma.png", cfg.levels.space)
    if curve is not None:
        tracker.log_artifact(parent, curve)
        log.info("loss vs %s: %s", cfg.levels.space, curve)
    return results


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its file (never in the working directory)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


@contextlib.contextmanager
def services(cfg: RunConfig, out: Path):
    """(store, tracker, storage), connected in that order after a check of every address."""
    uri = default_tracking_uri(cfg)
    check_reachable(uri)
    storage = Storage(cfg.storage.path or str((out / "storage").resolve()))
    storage.check_writable()
    if cfg.ray.address and cfg.ray.address != "auto":
        check_ray_address(cfg.ray.address)
    if (cfg.redis.url or "").startswith("memory://") and cfg.workers.backend != "inline":
        raise ConfigError(
            f"redis.url={cfg.redis.url}: an in-memory store lives in this process only; "
            "use it with workers.backend=inline, or pass a redis:// URL"
        )
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation chatter
    with contextlib.ExitStack() as stack:
        url = cfg.redis.url or stack.enter_context(EmbeddedRedis.for_run(out / "redis")).url
        store = open_store(url, cfg.redis.reconnect_seconds)
        mlflow_tracker = MlflowTracker(uri, cfg.mlflow.experiment or cfg.name, artifact_location(uri))
        tracker = QueuedTracker(mlflow_tracker, cfg.mlflow.wait_seconds)  # MLflow never holds up training
        stack.callback(tracker.close)
        yield store, tracker, storage


def where_to_look(cfg: RunConfig, tracker: Tracker, manifest: Manifest, out: Path) -> str:
    """The run's closing lines: its files, how to open MLflow on its store, what was registered."""
    uri = tracker.uri
    ui = (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
        + runs_url("http://127.0.0.1:5000", tracker.experiment_id)
        if uri.startswith("sqlite:")
        else "open " + runs_url(redact(uri), tracker.experiment_id)
    )
    names = ", ".join(f"{manifest.job(j).registered_model} v{v}" for j, v in manifest.registered.items())
    experiment = cfg.mlflow.experiment or cfg.name
    return "\n".join(
        [
            f"output: {out} (metrics.json, samples, loss_vs_sigma.png)",
            f"MLflow (experiment {experiment!r}, parent run {manifest.run_id}): {ui}",
            f"registered: {names}",
        ]
    )


def check_output_dir(out: Path) -> None:
    """``output_dir`` exists (created) and takes files, or a one-line error naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output_dir={out}: cannot write there ({one_line(e)}); choose a directory you can write"
        ) from None


def select_jobs(manifest: Manifest, only: list[str | JobId] | None) -> list[JobId]:
    """``only`` (e.g. ``["blocks/1"]``) checked against the run's jobs; None: every job."""
    if only is None:
        return list(manifest.jobs)
    jobs = [j if isinstance(j, JobId) else JobId.parse(j) for j in only]
    unknown = sorted(set(jobs) - set(manifest.jobs))
    if unknown:
        raise ConfigError(f"{unknown[0]}: run {manifest.run_id} has only {', '.join(map(str, manifest.jobs))}")
    return jobs


def run(cfg: RunConfig, *, only: list[str | JobId] | None = None) -> dict:
    """The whole run (``only``: train and register just these jobs, e.g. ``["blocks/1"]``)."""
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    check_output_dir(out)
    # the lock first: a second coordinator here must not touch the first one's services
    with OutputLock(out), services(cfg, out) as (store, tracker, storage), contextlib.ExitStack() as stack:
        if cfg.resume:
            store.manifest(cfg.resume)  # a run that is not there fails here, before the data is read
            stack.enter_context(RunLease(store, cfg.resume))  # and a run another coordinator drives
        cfg, data = open_data(cfg, storage)
        if cfg.resume:
            check_resume_settings(cfg, store.manifest(cfg.resume))
        log.info("data %s: %s (content hash %s)", data.root, data.card.describe(), data.card.content_hash[:12])
        workers = make_workers(cfg)  # a cluster that cannot host the blocks fails here, before any run is opened
        stack.callback(workers.shutdown)
        manifest = resume_run(cfg, store, tracker) if cfg.resume else new_run(cfg, store, tracker, storage, data)
        run_id = manifest.run_id
        if not cfg.resume:
            stack.enter_context(RunLease(store, run_id))
        (out / "last_run").write_text(f"{run_id}\n{redact(store.url)}\n")
        where = redact(store.url), redact(tracker.uri), redact(storage.root)
        log.info("run %s: Redis %s, MLflow %s, storage %s", run_id, *where)
        workers.attach(store, run_id)
        jobs = select_jobs(manifest, only)
        for job in jobs:
            s, units, space = manifest.job(job).spec, manifest.job(job).units, cfg.levels.space
            what = "plan: %s layers [%d, %d) %s [%.4g, %.4g] (training [%.4g, %.4g]), %d units"
            log.info(what, job, s.layer_start, s.layer_end, space, s.lo, s.hi, s.train_lo, s.train_hi, units)
        ok = killed = False
        try:
            t0 = time.perf_counter()
            previewer = Previewer(cfg, manifest, storage, tracker, data, out) if cfg.eval.every else None
            failed = train(cfg, manifest, store, tracker, workers, jobs, previewer)
            train_seconds = time.perf_counter() - t0
            finished = [j for j in jobs if j not in failed]
            log.info("registering %d trained blocks in MLflow's model registry", len(finished))
            register(manifest, store, tracker, storage, finished, data)
            if failed:  # the finished blocks are registered; the parent run ends FAILED
                timings = dict(train_seconds=train_seconds, wall_seconds=time.perf_counter() - t_start)
                raise end_partial(manifest, tracker, failed, out, config=cfg.to_dict(), **timings)
            results = {}
            if set(manifest.registered) == set(manifest.jobs):
                log.info("loading the registered sets back from the registry: sampling and evaluating")
                results = evaluate_sets(cfg, manifest, tracker, workers, out)
                head = ", ".join(p for p in (cfg.family.summary(cfg), f"{cfg.train.steps} steps per block") if p)
                print(f"\nrun {run_id} ({cfg.model.family}): {head}")
                print(format_table(results, cfg))
                registered = {str(j): v for j, v in manifest.registered.items()}
                path = write_metrics(
                    results,
                    out / "metrics.json",
                    run_id=run_id,
                    config=cfg.to_dict(),
                    train_seconds=train_seconds,
                    wall_seconds=time.perf_counter() - t_start,
                    registered=registered,
                    status="complete",
                )
                tracker.log_artifact(manifest.parent_run, path)
                print(where_to_look(cfg, tracker, manifest, out))
            ok = True
            return results
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers stop (their checkpoints stay valid)
            killed = True
            for job in manifest.jobs:
                if job not in manifest.registered:
                    tracker.end(manifest.job(job).mlflow_run, ok=False, killed=True)
            raise Interrupted(run_id, getattr(e, "code", 130)) from None
        finally:
            try:
                tracker.end(manifest.parent_run, ok=ok, killed=killed)
            except TrackingError:
                if ok:  # else the run's own error says more (the tracker's close names what MLflow missed)
                    raise
