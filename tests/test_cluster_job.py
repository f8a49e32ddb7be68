"""The README's "On a Ray cluster" lines, followed literally on a head of the test's own.

The head is ``ray start --head --dashboard-host=127.0.0.1`` as the README writes it, plus private
ports and temp dir, with Ray's token auth on and a token of the test's own (HOME is a temporary
directory, so ``~/.ray/auth_token`` is the test's, never the user's), started from outside the venv
(the venv's ``bin`` is not on PATH: the job must bring its own Python). The job is
``deploy/submit.sh`` with the tiny debug job; it must succeed and register its blocks in a sqlite
MLflow store under the test's directory. The README's ``ray stop`` would stop every Ray process of
the user on the machine: the test stops its head through the ``ray start --block`` process group
it started instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from services import ROOT, service_stack

from helpers import TINY_DEBUG_JOB
from worker.record import JobId
from worker.store import RedisStore

VENV_BIN = Path(sys.executable).parent
SUBMIT = ROOT / "deploy" / "submit.sh"


def readme_lines() -> list[str]:
    """The commands of the first code block of the README's "On a Ray cluster" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a Ray cluster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def readme_command(start: str) -> list[str]:
    """The README's line that starts with ``start``, split into words."""
    (line,) = [line for line in readme_lines() if line.startswith(start)]
    return shlex.split(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now, below the ephemeral range and above
    Ray's default worker ports (10002-19999), so that neither other Rays nor clients take them."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - n)
        if all(_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in 20000-30000")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def get(url: str, token: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-auth Ray head on private ports, its own HOME and temp dir; yields (address, env)."""
    base = tmp_path_factory.mktemp("cluster")
    home = base / "home"
    home.mkdir()
    # Ray's socket paths must stay short (< 108 bytes): the temp dir is a short one under /tmp
    temp_dir = Path(tempfile.mkdtemp(prefix="dbh", dir="/tmp"))
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    drop = ("VIRTUAL_ENV", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"HOME": str(home), "PATH": path}
    ray = str(VENV_BIN / "ray")  # the README's `.venv/bin/ray`, whatever venv runs the tests
    # a token of the test's own, in the test's ~/.ray/auth_token
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()

    start = readme_command(".venv/bin/ray start --head")
    dash, workers = free_port(), free_range(40)
    private = [
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 39}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--disable-usage-stats",
        "--block",  # this process owns the head's daemons and stops them on SIGTERM
    ]
    log = open(base / "head.log", "w")  # noqa: SIM115 - open for the head's lifetime
    proc = subprocess.Popen(
        [ray, *start[1:], *private],
        env=env | {"RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the only processes the test stops
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 150
        while get(f"{address}/api/version", token)[0] != 200:
            assert proc.poll() is None, (base / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not answer in 150 s"
            time.sleep(1)
        yield address, env, token
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block`` (it stops its daemons), then SIGKILL whatever of its process
    group and of its descendants is left after 20 s."""
    import psutil

    ours = []
    with contextlib.suppress(psutil.Error):
        ours = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:  # the leader is alive, so its process group is still ours
        os.killpg(proc.pid, signal.SIGKILL)
    for p in ours:  # psutil checks each is still the process it saw (pid and start time)
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(timeout=30)


def submit(address: str, env: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    assert readme_command("deploy/submit.sh")[0] == "deploy/submit.sh"
    return subprocess.run(
        [str(SUBMIT), *args],
        cwd=ROOT,
        env=env | {"RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_readme_job_runs_on_a_token_auth_head(head, redis_server, tmp_path):
    address, env, _ = head
    assert get(f"{address}/api/version")[0] == 401  # token auth is on: no token, no job API
    stack = service_stack(redis_server, tmp_path, db=9)
    out = tmp_path / "out"
    readme = readme_command("deploy/submit.sh")[1:]  # experiment=debug
    # the tiny job, its blocks on Ray actors of the head (they too must get the job's Python)
    job = [*readme, *(a for a in TINY_DEBUG_JOB if a not in readme and a != "workers.backend=inline")]
    proc = submit(
        address, env, *job, f"redis.url={stack['redis']}", f"mlflow.tracking_uri={stack['mlflow']}", f"output_dir={out}"
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert "auth: token" in said and "succeeded" in said, said[-4000:]
    run = json.loads((out / "metrics.json").read_text())["run_id"]
    c = MlflowClient(stack["mlflow"], registry_uri=stack["mlflow"])
    store = RedisStore(stack["redis"])
    for b in range(2):
        version = c.get_model_version_by_alias(f"debug-block{b}", "champion")
        assert version.tags["run_id"] == run and version.tags["block"] == str(b)
        assert store.progress(run, JobId.parse(f"blocks/{b}"))["consumer"] == f"actor-blocks/{b}"


def test_a_token_head_without_a_token_here_is_one_line(head, tmp_path):
    address, env, _ = head
    (tmp_path / "home").mkdir()
    proc = submit(address, env | {"HOME": str(tmp_path / "home")}, "experiment=debug", timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "uses token auth" in line and "ray get-auth-token" in line, line


def test_a_wrong_token_is_one_line(head):
    address, env, _ = head
    proc = submit(address, env | {"RAY_AUTH_TOKEN": "0" * 64}, "experiment=debug", timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "refuses this machine's token" in line, line


def test_no_head_is_one_line():
    proc = submit(f"http://127.0.0.1:{free_port()}", dict(os.environ), "experiment=debug", timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "no Ray job server answers" in line, line
