"""Closed-form oracles shared by the tests.

The paper's constants (design.md Part 1) are written out here on purpose, not imported from the
library, so the tests check the library against the paper rather than against itself.
"""

from __future__ import annotations

import math
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
