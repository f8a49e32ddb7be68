"""The distributed main job against real services: a local Ray, a real redis-server, a real MLflow
sqlite store, at debug size. Each test runs the real entry points as subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import redis
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from services import ROOT, error_lines, run_cli, service_stack

from dblocks.checkpoint import load_checkpoint
from dblocks.families import get_family
from dblocks.levels import SigmaLevels
from dblocks.models.dit import DiTBlock, dit_config
from dblocks.plan import make_plan
from helpers import wait_for
from worker.block_worker import checkpoint_rel, export_rel
from worker.record import JobId
from worker.store import RedisStore, keys

# 4 units per block. 200 steps (a few seconds of training) so that the three actors' training
# overlaps by more than their start-up skew (test_blocks_trained_concurrently_on_their_own_actors).
TINY = [
    "experiment=debug",
    "train.steps=200",
    "train.unit_steps=50",
    "train.checkpoint_every=100",
    "sample.steps=5",
    "sample.per_class=2",
    "registry.champion_threshold=0",  # 200 steps cannot reach a real bar; promotion itself is tested
]
# Long enough to kill a worker in the middle: 20 units of 10 steps per block. One torch thread in
# every worker, whatever the backend: runs compared for bit-identical weights must compute alike.
LONG = [
    "experiment=debug",
    "train.steps=200",
    "train.unit_steps=10",
    "train.checkpoint_every=30",
    "train.batch_size=64",
    "train.threads=1",
    "sample.steps=5",
    "sample.per_class=2",
    "registry.champion_threshold=0",
    "baseline=false",
]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """Services shared by this module: one Redis db, one MLflow store."""
    return service_stack(redis_server, tmp_path_factory.mktemp("stack"), db=0)


def services(stack, name: str) -> list[str]:
    return [
        f"redis.url={stack['redis']}",
        f"mlflow.tracking_uri={stack['mlflow']}",
        f"output_dir={stack['base'] / name}",
    ]


def runs_of(stack) -> set[str]:
    return redis.Redis.from_url(stack["redis"], decode_responses=True).smembers(keys.runs)


def progress(stack, run: str, job: str) -> dict:
    return RedisStore(stack["redis"]).progress(run, JobId.parse(job))


def client(stack) -> MlflowClient:
    return MlflowClient(stack["mlflow"], registry_uri=stack["mlflow"])


def exported(stack, name: str, run: str, job: str) -> dict:
    return load_checkpoint(stack["base"] / name / "storage" / export_rel(run, JobId.parse(job)))[0]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def job(stack):
    before = runs_of(stack)
    proc = run_cli("coordinator", *TINY, "eval.every=2", *services(stack, "main"))  # previews on Ray: a thread
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(stack) - before
    return run, proc


def test_job_trains_registers_samples_and_reports(job, stack):
    run, proc = job
    out = stack["base"] / "main"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == run
    assert set(metrics["results"]) == {"DiffusionBlocks B=2", "end-to-end"}
    for row in metrics["results"].values():
        assert {"heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy"} <= set(row)
        assert row["classifier_test_accuracy"] >= 0.97
    grid = Image.open(out / "blocks" / "samples.png")  # rows = digits, sample.per_class=2 columns, 4x
    assert grid.size == ((2 * 9 + 1) * 4, (10 * 9 + 1) * 4)
    assert "classifier acc. on samples" in proc.stdout


def test_blocks_trained_concurrently_on_their_own_actors(job, stack):
    run, _ = job
    jobs = ["blocks/0", "blocks/1", "e2e/0"]
    p = {j: progress(stack, run, j) for j in jobs}
    assert all(p[j]["state"] == "done" and p[j]["consumer"] == f"actor-{j}" for j in jobs)
    assert len({p[j]["pid"] for j in jobs}) == 3  # three processes
    start, end = max(float(p[j]["started_at"]) for j in jobs), min(float(p[j]["finished_at"]) for j in jobs)
    assert start < end  # some moment when all three were training at once


def test_each_worker_process_held_only_its_block(job, stack):
    """Trainable parameters alive in each actor's process = (end-to-end - E) / B + E, where E is
    what every block owns besides its layers (patch embedding, sigma/label embedders, head)."""
    run, _ = job
    cfg = dit_config("debug")
    size = lambda layers: sum(p.numel() for p in DiTBlock(cfg, layers).parameters())  # noqa: E731
    e2e, emb = size(cfg.layers), 2 * size(1) - size(2)
    held = {j: int(progress(stack, run, j)["process_trainable_params"]) for j in ["blocks/0", "blocks/1", "e2e/0"]}
    assert held["e2e/0"] == e2e
    for b in range(2):
        assert (
            held[f"blocks/{b}"]
            == (e2e - emb) // 2 + emb
            == int(progress(stack, run, f"blocks/{b}")["trainable_params"])
        )


def test_finished_blocks_are_registered_tagged_aliased_and_loadable(job, stack):
    run, _ = job
    c = client(stack)
    plan = make_plan(SigmaLevels(), 2, 6)
    for b, spec in enumerate(plan):
        v = c.get_model_version_by_alias(f"debug-block{b}", "champion")
        assert c.get_model_version_by_alias(f"debug-block{b}", "candidate").version == v.version
        assert {"candidate", "champion"} <= set(v.aliases)
        assert v.tags["block"] == str(b) and v.tags["num_blocks"] == "2" and v.tags["run_id"] == run
        assert float(v.tags["lo"]) == spec.lo and float(v.tags["hi"]) == spec.hi  # not widened
    assert c.get_model_version_by_alias("debug-e2e-block0", "candidate").tags["num_blocks"] == "1"
    mlflow.set_tracking_uri(stack["mlflow"])  # both: an in-process run of an earlier test set them globally
    mlflow.set_registry_uri(stack["mlflow"])
    model = mlflow.pyfunc.load_model("models:/debug-block1@champion")
    net = model.unwrap_python_model().net
    weights = exported(stack, "main", run, "blocks/1")
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    z = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32) * 0.1
    d = model.predict({"z": z, "sigma": np.full(3, 0.1, np.float32), "labels": np.array([1, 2, 3])})  # the signature
    assert d.shape == z.shape and np.isfinite(d).all()


def test_mlflow_has_the_parent_run_child_runs_metrics_and_artifacts(job, stack):
    run, _ = job
    c = client(stack)
    exp = c.get_experiment_by_name("debug")
    (parent,) = c.search_runs([exp.experiment_id], f"tags.`dblocks.run_id` = '{run}'")
    children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["blocks/0", "blocks/1", "e2e/0"]
    for r in children:
        assert {"loss", "samples_per_s", "grad_norm", "rss_mb"} <= set(r.data.metrics)
        assert sum(k.startswith("loss_sigma/") for k in r.data.metrics) == 4  # named by their sigma ranges
        assert len(c.get_metric_history(r.info.run_id, "loss")) == 4  # one point per work unit
    assert parent.data.params["blocks.num"] == "2"
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"manifest.json", "config.json", "metrics.json", "samples", "loss_vs_sigma.png"} <= arts
    for model in ("blocks", "e2e"):  # previews while training (eval.every=2 of 4 units): at least the last
        grids = {a.path for a in c.list_artifacts(parent.info.run_id, f"samples/during/{model}")}
        assert grids and grids <= {f"samples/during/{model}/unit-{n}.png" for n in (2, 4)}
        steps = [m.step for m in c.get_metric_history(parent.info.run_id, f"preview/{model}/heldout_loss")]
        assert steps and set(steps) <= {2, 4} and len(steps) == len(grids)
    assert any(k.startswith("system/") for k in parent.data.metrics)


@pytest.fixture(scope="module")
def uninterrupted(stack):
    """``uninterrupted(backend)``: (output name, run id) of a LONG run on that backend, run once."""
    done: dict[str, tuple[str, str]] = {}

    def get(backend: str) -> tuple[str, str]:
        if backend not in done:
            before, name = runs_of(stack), f"ref-{backend}"
            proc = run_cli("coordinator", *LONG, f"workers.backend={backend}", *services(stack, name))
            assert proc.returncode == 0, proc.stderr[-3000:]
            (run,) = runs_of(stack) - before
            done[backend] = name, run
        return done[backend]

    return get


def test_killed_worker_restarts_only_its_block_and_loses_or_repeats_no_unit(stack, uninterrupted):
    before = runs_of(stack)
    args = [sys.executable, "-m", "coordinator", *LONG, *services(stack, "kill")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = wait_for(lambda: next(iter(runs_of(stack) - before), None), 300, "the run")
    p = wait_for(
        lambda: (q := progress(stack, run, "blocks/0")).get("state") == "training" and int(q["units_done"]) >= 4 and q,
        300,
        "block 0 mid-run",
    )
    os.kill(int(p["pid"]), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "blocks/0 failed" in err and "restart 1/2" in err and "blocks/1 failed" not in err
    p0, p1 = progress(stack, run, "blocks/0"), progress(stack, run, "blocks/1")
    assert p0["restarts"] == "1" and "restarts" not in p1 and p0["pid"] != p["pid"]
    store = RedisStore(stack["redis"])
    for b in range(2):  # every unit delivered, applied and acknowledged; the checkpoint lists each once
        job = JobId("blocks", b)
        assert store.queue_counts(run, job) == {"entries": 20, "pending": 0}
        _, meta = load_checkpoint(stack["base"] / "kill" / "storage" / checkpoint_rel(run, job))
        assert meta["units"] == list(range(20)) and meta["samples"] == 200 * 64
    assert int(p0["units_applied"]) >= 20 and p1["units_applied"] == "20"  # block 0 redid what its checkpoint lacked
    # Bit-identical to an uninterrupted run of the same config, backend and threads (its own run).
    ref, ref_run = uninterrupted("ray")
    for b in range(2):
        assert same_weights(exported(stack, "kill", run, f"blocks/{b}"), exported(stack, ref, ref_run, f"blocks/{b}"))


def test_ray_actors_and_the_inline_backend_train_the_same_weights(stack, uninterrupted):
    """The same config on one torch thread each: a block trained in a Ray actor equals the block
    trained in the coordinator's process, bit for bit."""
    (ray_name, ray_run), (inline_name, inline_run) = uninterrupted("ray"), uninterrupted("inline")
    for b in range(2):
        job = f"blocks/{b}"
        assert same_weights(exported(stack, ray_name, ray_run, job), exported(stack, inline_name, inline_run, job))


def test_external_worker_joins_a_run_and_its_block_is_registered_like_the_others(stack):
    before = runs_of(stack)
    coord = subprocess.Popen(
        [sys.executable, "-m", "coordinator", *TINY, "baseline=false", "workers.external=[1]", *services(stack, "ext")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = wait_for(lambda: next(iter(runs_of(stack) - before), None), 300, "the run")
    wait_for(lambda: progress(stack, run, "blocks/0").get("state") == "done", 300, "block 0")
    assert progress(stack, run, "blocks/1")["state"] == "queued"  # nobody took it
    worker = run_cli("worker", "block=1", f"run={run}", f"redis.url={stack['redis']}")
    assert worker.returncode == 0, worker.stderr[-3000:]
    _, err = coord.communicate(timeout=600)
    assert coord.returncode == 0, err[-3000:]
    assert progress(stack, run, "blocks/1")["consumer"].startswith("external-")
    c = client(stack)
    for b in range(2):
        v = c.get_model_version_by_alias(f"debug-block{b}", "candidate")
        assert v.tags["run_id"] == run and v.tags["block"] == str(b)


def test_standalone_block_registers_and_a_mixed_set_is_refused(job, stack):
    """``python -m coordinator only=[1] experiment=...`` trains block 1 alone (seed 1: another plan)
    and registers it; a set mixing it with block 0 of the seed-0 run is refused in one line."""
    proc = run_cli("coordinator", "only=[1]", *TINY, "seed=1", *services(stack, "alone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = client(stack)
    alone = c.get_model_version_by_alias("debug-block1", "candidate")
    main0 = c.get_model_version_by_alias("debug-block0", "champion")
    assert alone.tags["plan_hash"] != main0.tags["plan_hash"]
    c.set_registered_model_alias("debug-block0", "mixed", main0.version)
    c.set_registered_model_alias("debug-block1", "mixed", alone.version)
    bad = run_cli("coordinator.sample", "experiment=debug", "alias=mixed", *services(stack, "sample"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "from 2 plans" in bad.stderr
    good = run_cli("coordinator.sample", "experiment=debug", "alias=champion", *services(stack, "sample"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert Image.open(stack["base"] / "sample" / "samples-champion.png").size == ((10 * 9 + 1) * 4, (10 * 9 + 1) * 4)
    parent = c.get_run(main0.run_id).data.tags["mlflow.parentRunId"]  # the run, not block 0's child run
    assert "samples/champion/samples-champion.png" in {a.path for a in c.list_artifacts(parent, "samples/champion")}


@pytest.mark.parametrize(
    "module, overrides, says",
    [
        ("coordinator", ["redis.url=redis://127.0.0.1:1/0"], "redis.url=redis://127.0.0.1:1/0: cannot reach Redis"),
        (
            "coordinator",
            ["mlflow.tracking_uri=http://127.0.0.1:1"],
            "mlflow.tracking_uri=http://127.0.0.1:1: cannot reach",
        ),
        ("coordinator", ["ray.address=127.0.0.1:1"], "ray.address=127.0.0.1:1: nothing listens there"),
        ("coordinator", ["resume=nope"], "run=nope: no such run"),
        ("coordinator", ["workers.external=[5]"], "workers.external=[5]: block 5 is not in 0..1"),
        (
            "coordinator",
            ["workers.num_gpus=1", "ray.num_gpus=0"],
            "workers.num_gpus=1: this machine's Ray has 0 GPU",
        ),
        ("coordinator", ["ray.num_cpus=1", "workers.num_cpus=2"], "workers.num_cpus=2: this machine's Ray has 1 CPU"),
        ("worker", ["block=0", "run=nope"], "run=nope: no such run"),
        ("worker", ["block=5", "run=RUN"], "block=5: run RUN has blocks 0..1"),
        ("coordinator", ["only=[5]"], "only=[5]: block 5 is not in 0..1"),
    ],
)
def test_bad_addresses_runs_and_blocks_fail_in_one_line(module, overrides, says, job, stack, tmp_path):
    run, _ = job
    overrides = [o.replace("RUN", run) for o in overrides]
    extra = [f"redis.url={stack['redis']}"] if not any(o.startswith("redis.url") for o in overrides) else []
    proc = run_cli(
        module,
        "experiment=debug",
        *extra,
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
        f"output_dir={tmp_path}/out",
        *overrides,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)  # one line, after the progress log (if any)
    assert len(lines) == 1 and says.replace("RUN", run) in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize(
    "override, field",
    [
        ("blocks.num=0", "blocks.num"),
        ("blocks.num=12", "blocks.num"),
        ("blocks.num=4", "blocks.num"),  # does not divide 6 layers
        ("noise.sigma_min=100", "noise.sigma_min"),
        ("blocks.gamma=-0.1", "blocks.gamma"),
        ("model.size=huge", "model.size"),
        ("blocks.partition=linear", "blocks.partition"),
        ("workers.backend=spark", "workers.backend"),
        ("train.batch_size=5000", "train.batch_size"),  # the digits have 1437 training rows
    ],
)
def test_bad_config_fails_at_start_with_one_line_naming_the_field(override, field, tmp_path):
    proc = run_cli(
        "coordinator",
        "experiment=debug",
        "workers.backend=inline",
        override,
        f"output_dir={tmp_path / 'out'}",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and field in lines[0], proc.stderr
    assert not (tmp_path / "out" / "storage" / "runs").exists()


def test_one_block_is_the_end_to_end_model(stack):
    proc = run_cli(
        "coordinator", *TINY, "blocks.num=1", "baseline=false", "workers.backend=inline", *services(stack, "b1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((stack["base"] / "b1" / "metrics.json").read_text())
    assert list(metrics["results"]) == ["end-to-end"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head started with the CLI (`ray start --head`), stopped by its own PIDs."""
    import psutil

    from coordinator.redis_server import free_port

    tmp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dash, gcs = free_port(), free_port()
    before = {p.pid for p in psutil.process_iter()}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=4",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [p for p in psutil.process_iter() if p.pid not in before]
    yield f"http://127.0.0.1:{dash}", env
    for p in started:
        with contextlib.suppress(psutil.Error):
            p.kill()


def test_the_same_run_through_ray_job_submit(ray_head, stack):
    address, env = ray_head
    before = runs_of(stack)
    excludes = json.dumps({"excludes": [".git", ".venv", "outputs", "mlruns", "bench/results", "*.whl"]})
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env-json",
            excludes,
            "--",
            "python",
            "-m",
            "coordinator",
            *TINY,
            *services(stack, "submit"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    (run,) = runs_of(stack) - before
    assert json.loads((stack["base"] / "submit" / "metrics.json").read_text())["run_id"] == run
    c = client(stack)
    assert all(c.get_model_version_by_alias(f"debug-block{b}", "champion").tags["run_id"] == run for b in range(2))


def test_a_killed_coordinator_resumes_its_run_by_id(stack, uninterrupted):
    """SIGKILL the coordinator mid-run; ``resume=<run id>`` finishes the same run from Redis and the
    checkpoints, with the same weights as an uninterrupted run of the same backend."""
    ref, ref_run = uninterrupted("inline")
    before = runs_of(stack)
    args = [sys.executable, "-m", "coordinator", *LONG, "workers.backend=inline", *services(stack, "resume")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = wait_for(lambda: next(iter(runs_of(stack) - before), None), 300, "the run")
    wait_for(lambda: int(progress(stack, run, "blocks/0").get("units_done", 0)) >= 4, 300, "block 0 mid-run")
    proc.kill()
    proc.wait()
    assert progress(stack, run, "blocks/1").get("state") == "queued"
    done = run_cli("coordinator", *LONG, "workers.backend=inline", f"resume={run}", *services(stack, "resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert runs_of(stack) - before == {run}  # no new run
    assert json.loads((stack["base"] / "resume" / "metrics.json").read_text())["run_id"] == run
    for b in range(2):
        assert same_weights(exported(stack, "resume", run, f"blocks/{b}"), exported(stack, ref, ref_run, f"blocks/{b}"))
    c = client(stack)
    (parent,) = c.search_runs([c.get_experiment_by_name("debug").experiment_id], f"tags.`dblocks.run_id` = '{run}'")
    assert parent.info.status == "FINISHED"


def test_block_actors_are_placed_by_gpu_and_custom_resources(stack):
    """Logical GPUs (no hardware): two blocks with workers.num_gpus=0.5 share the one GPU, pinned
    by a custom resource, and train at the same time; on a machine without CUDA they fall back to the CPU."""
    before = runs_of(stack)
    proc = run_cli(
        "coordinator",
        *TINY,
        "baseline=false",
        "ray.num_gpus=1",
        "ray.resources={A100:2}",
        "workers.num_gpus=0.5",
        "workers.resources={A100:1}",
        *services(stack, "gpu"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(stack) - before
    p = [progress(stack, run, f"blocks/{b}") for b in range(2)]
    assert [q["cuda_visible_devices"] for q in p] == ["0", "0"]  # Ray gave both the same GPU
    assert max(float(q["started_at"]) for q in p) < min(float(q["finished_at"]) for q in p)
    assert all(q["device"] == ("cuda" if torch.cuda.is_available() else "cpu") for q in p)


# Every family through the same distributed path: blocks on Ray actors, Redis units, MLflow registry,
# evaluation by a sampler actor that loads the set back from the registry.
FAMILY_RUNS = {  # experiment -> (B, the family's headline metric, writes a text sample?)
    "vit_digits": (3, "test_accuracy", False),
    "ar_text": (4, "val_ce", True),
    "mdm_text": (3, "test_bpc", True),
    "recurrent_text": (1, "val_loss", True),
}


@pytest.mark.parametrize("experiment", list(FAMILY_RUNS))
def test_every_family_trains_registers_and_predicts_through_the_distributed_job(experiment, stack):
    num_blocks, metric, text = FAMILY_RUNS[experiment]
    out = stack["base"] / experiment
    anything = 0 if get_family(experiment.split("_")[0]).headline.higher_is_better else 1e9  # promotion is tested
    proc = run_cli(
        "coordinator",
        f"experiment={experiment}",
        "model.size=debug",
        "train.steps=10",
        "train.unit_steps=5",
        "train.checkpoint_every=5",
        "train.batch_size=16",
        f"registry.champion_threshold={anything}",
        *services(stack, experiment),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {f"DiffusionBlocks B={num_blocks}", "end-to-end"}
    for row in results.values():
        assert np.isfinite(row[metric])
    if text:
        assert (out / "blocks" / "sample.txt").read_text() and (out / "e2e" / "sample.txt").read_text()
    name = experiment.replace("_", "-")
    c = client(stack)
    for b in range(num_blocks):
        version = c.get_model_version_by_alias(f"{name}-block{b}", "champion")
        assert version.tags["num_blocks"] == str(num_blocks) and version.tags["block"] == str(b)
    assert c.get_model_version_by_alias(f"{name}-e2e-block0", "champion")
