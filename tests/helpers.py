"""Closed-form oracles shared by the tests.

The paper's constants (design.md Part 1) are written out here on purpose, not imported from the
library, so the tests check the library against the paper rather than against itself.
"""

from __future__ import annotations

import math
import time
from statistics import NormalDist

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
P_MEAN = -1.2
P_STD = 1.2
SIGMA_DATA = 0.5

PHI = NormalDist()


def std_log(sigma: float) -> float:
    """(ln sigma - P_mean) / P_std."""
    return (math.log(sigma) - P_MEAN) / P_STD


def trunc_cdf(sigma: float, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> float:
    """CDF of ln(sigma) ~ N(P_mean, P_std^2) truncated to [lo, hi]."""
    qa, qb = PHI.cdf(std_log(lo)), PHI.cdf(std_log(hi))
    return (PHI.cdf(std_log(sigma)) - qa) / (qb - qa)


def interval_mass(lo: float, hi: float) -> float:
    """Mass of [lo, hi] under the whole truncated log-normal on [sigma_min, sigma_max]."""
    return trunc_cdf(hi) - trunc_cdf(lo)


def binomial_tol(p: float, n: int, z: float = 5.0) -> float:
    """z standard errors of a binomial proportion: a fixed-seed check that a correct
    implementation fails with probability ~6e-7 per comparison (z=5)."""
    return z * math.sqrt(p * (1 - p) / n)


# The smallest whole job: the debug preset's 2 blocks (no baseline), one 10-step unit each, inline
# workers, a few sampling steps, promotion at any value. Add services and output_dir.
TINY_DEBUG_JOB = [
    "experiment=debug",
    "workers.backend=inline",
    "baseline=false",  # the blocks only: the baseline's path is the same code, twice the time
    "train.steps=10",
    "train.unit_steps=10",
    "train.checkpoint_every=10",
    "train.batch_size=16",
    "sample.steps=5",
    "sample.per_class=2",
    "registry.champion_threshold=0",
]


def family_run(name: str, batch_size: int = 8, **train):
    """A RunConfig of family ``name`` at debug size on its built-in data (2 blocks; the recurrent
    core: 1), with ``train.*`` overrides."""
    from dblocks.families import FAMILIES
    from worker.config import load_run_config

    family = FAMILIES[name]
    return load_run_config(
        {
            "name": f"t-{name}",
            "model": {"family": name, "size": "debug"},
            "data": {"source": family.data},
            "blocks": {"num": 1 if family.one_block else 2},
            "train": {"batch_size": batch_size, **train},
        }
    )


def mlflow_client(uri: str):
    """An MlflowClient whose tracking *and* registry stores are ``uri``. Without the registry URI
    MlflowClient takes MLflow's process-global one, which an earlier in-process run leaves set."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def wait_for(cond, timeout: float, what: str):
    """``cond()``'s first truthy value, polled every 50 ms; an AssertionError naming ``what`` after
    ``timeout`` seconds. Timeouts are generous bounds, never expectations."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
