"""What the integration tests share: running an entry point as a subprocess, and the services
(one Redis database, one sqlite MLflow store) that a module's runs share."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <overrides>`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def service_stack(redis_server, base: Path, db: int) -> dict:
    """Redis database ``db`` of the session's server (flushed) and an MLflow store under ``base``."""
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    return {"redis": url, "mlflow": f"sqlite:///{base}/mlflow.db", "base": base}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without log lines (ours ``HH:MM:SS message``; Ray's and MLflow's dated): what a failed command said."""
    log = re.compile(r"(\d{4}[-/]\d\d[-/]\d\d )?\d\d:\d\d:\d\d[ ,]")
    return [line for line in proc.stderr.strip().splitlines() if not log.match(line)]
