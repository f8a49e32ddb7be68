"""A password in ``redis.url`` never reaches a file, a log line or an MLflow record of a run."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from coordinator.redis_server import EmbeddedRedis
from coordinator.tracking import NullTracker
from helpers import TINY_DEBUG_JOB
from worker.redaction import redact, redact_config

SECRET = "plantedS3cretXYZ"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"redis://:{SECRET}@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (f"rediss://default:{SECRET}@h:6380/2", "rediss://default:***@h:6380/2"),
        (f"http://user:{SECRET}@mlflow:5000", "http://user:***@mlflow:5000"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),  # nothing to hide: unchanged
        ("http://host:5000/path", "http://host:5000/path"),
        (
            f"run x: Redis redis://:{SECRET}@h:1/0, MLflow sqlite:///a.db",
            "run x: Redis redis://:***@h:1/0, MLflow sqlite:///a.db",
        ),
    ],
)
def test_redact_masks_the_password_only(url, shown):
    assert redact(url) == shown


def test_params_and_configs_are_redacted():
    cfg = {"redis": {"url": f"redis://:{SECRET}@h:1/0"}, "train": {"steps": 3}, "x": [f"http://u:{SECRET}@h"]}
    assert SECRET not in repr(redact_config(cfg)) and redact_config(cfg)["train"] == {"steps": 3}
    tracker = NullTracker()
    run = tracker.start_run("r", {})
    tracker.log_params(run, cfg)
    assert tracker.params[run]["redis.url"] == "redis://:***@h:1/0"


def test_a_run_writes_no_planted_password(tmp_path, monkeypatch, capsys):
    """A whole debug run on a Redis that requires the password: every file under the output directory
    (MLflow's sqlite store and artifacts included), the console and the logs are searched for it."""
    from coordinator.__main__ import main

    out = tmp_path / "out"
    with EmbeddedRedis(tmp_path / "redis-data", password=SECRET) as server:
        argv = [*TINY_DEBUG_JOB, f"redis.url={server.url}", f"output_dir={out}"]
        monkeypatch.setattr(sys, "argv", ["dblocks-run", *argv])
        main()
    said = capsys.readouterr()
    assert (out / "metrics.json").is_file() and (out / "mlflow.db").is_file()
    assert SECRET not in said.out + said.err
    assert "redis://:***@127.0.0.1" in (out / "last_run").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" for p in files) and any("mlartifacts" in p.parts for p in files)
    stored = [p for p in (tmp_path / "redis-data").rglob("*") if p.is_file()]  # the run store's AOF: the manifest
    leaks = [str(p) for p in files + stored if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    for saved in (p for p in files if p.parent.name == ".hydra"):
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600, saved


RAY_LISTENERS = """
import json, sys, psutil, ray
from coordinator.workers import RayWorkers
from dblocks.config import RunConfig
workers = RayWorkers(RunConfig(), temp_dir=sys.argv[1])
me = psutil.Process()
ray_pids = {me.pid} | {p.pid for p in me.children(recursive=True)}  # the driver, its GCS, raylet, workers
listening = [c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ray_pids]
workers.shutdown()
print(json.dumps(listening))
"""


def test_a_local_ray_listens_on_loopback_only():
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths under it must fit 107 bytes
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RAY_LISTENERS, temp],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(listening) >= 3  # the GCS, the raylet's servers, the driver's
    assert {ip.removeprefix("::ffff:") for ip in listening} == {"127.0.0.1"}, listening
