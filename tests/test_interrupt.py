"""Ctrl-C (SIGINT) or SIGTERM mid-run: one line saying how to continue, MLflow runs KILLED (not
RUNNING forever), the last checkpoints valid; the printed command finishes the run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from services import ROOT, error_lines

from helpers import TINY_DEBUG_JOB, mlflow_client, wait_for
from worker.record import JobId
from worker.store import RedisStore, keys

LONG = [*TINY_DEBUG_JOB, "train.steps=300", "train.unit_steps=10", "train.checkpoint_every=10", "train.threads=1"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_how_to_continue_and_the_command_finishes_it(sig, code, redis_url, tmp_path):
    out = tmp_path / "out"
    args = [*LONG, f"redis.url={redis_url}", f"output_dir={out}"]
    store = RedisStore(redis_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = wait_for(lambda: next(iter(store.r.smembers(keys.runs)), None), 300, "the run")
    job = JobId("blocks", 0)
    wait_for(lambda: int(store.progress(run, job).get("units_done", 0)) >= 2, 300, "block 0 mid-run")
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    said = error_lines(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(said) == 1 and said[0].startswith("interrupted; continue with: python -m coordinator "), said
    command = said[0].removeprefix("interrupted; continue with: ")
    assert f"resume={run}" in command and f"output_dir={out}" in command

    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "debug"]
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}  # the parent and both blocks' child runs

    again = shlex.split(command)
    assert again[:3] == ["python", "-m", "coordinator"]
    done = subprocess.run([sys.executable, *again[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["run_id"] == run
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dblocks.run_id") == run]
    assert [r.info.status for r in parent] == ["FINISHED"]
    assert Path(out / "last_run").read_text().splitlines()[0] == run
