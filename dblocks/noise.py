"""Noise levels: EDM's truncated log-normal, the equal-mass block partition, routing, grids.

Paper notation: the whole model covers [sigma_min, sigma_max]; block b covers
[sigma_lo, sigma_hi]. ``ln sigma ~ N(p_mean, p_std^2)`` truncated to [sigma_min, sigma_max]
(EDM, Karras et al. 2022; DiffusionBlocks Sec. 3.2).

Block order: block 0 holds the first layers, where noise enters, and owns the HIGHEST
sigma range; block B-1 owns the lowest. A sigma exactly on an interior boundary belongs to
the higher-noise block.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
P_MEAN = -1.2
P_STD = 1.2

_NORMAL = NormalDist()
PARTITION_KINDS = ("equiprob", "uniform_log")


def _check_range(sigma_min: float, sigma_max: float, p_std: float = 1.0) -> None:
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"noise.sigma_min={sigma_min} and noise.sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
    if p_std <= 0.0:
        raise ValueError(f"noise.p_std={p_std}: must be > 0")


def lognormal_cdf(sigma: float, *, p_mean: float = P_MEAN, p_std: float = P_STD) -> float:
    """Phi((ln sigma - P_mean) / P_std): CDF of the (untruncated) EDM log-normal."""
    return _NORMAL.cdf((math.log(sigma) - p_mean) / p_std)


def lognormal_icdf(q: float, *, p_mean: float = P_MEAN, p_std: float = P_STD) -> float:
    """exp(P_mean + P_std * Phi^-1(q)): inverse of :func:`lognormal_cdf`."""
    return math.exp(p_mean + p_std * _NORMAL.inv_cdf(q))


def truncated_quantile(
    f: float,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> float:
    """The sigma below which a fraction f of the truncated log-normal's mass lies.

    exp(P_mean + P_std Phi^-1(q_min + f (q_max - q_min))), q_min/q_max the CDF at sigma_min/sigma_max.
    Partition boundaries and the inference grid both use it, so grid points land exactly on boundaries.
    """
    if f <= 0.0:
        return float(sigma_min)
    if f >= 1.0:
        return float(sigma_max)
    q_min = lognormal_cdf(sigma_min, p_mean=p_mean, p_std=p_std)
    q_max = lognormal_cdf(sigma_max, p_mean=p_mean, p_std=p_std)
    return lognormal_icdf(q_min + f * (q_max - q_min), p_mean=p_mean, p_std=p_std)


def partition_sigmas(
    num_blocks: int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    kind: str = "equiprob",
) -> list[float]:
    """B+1 ascending block boundaries sigma^(0..B) (Sec. 3.2, equal probability mass).

    ``equiprob``: q_i = q_min + (i/B)(q_max - q_min), sigma^(i) = exp(P_mean + P_std Phi^-1(q_i)),
    so every interval holds exactly 1/B of the truncated log-normal's mass.
    ``uniform_log``: the ablation baseline, equal parts of [ln sigma_min, ln sigma_max].
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"blocks.num={num_blocks}: must be an integer >= 1")
    _check_range(sigma_min, sigma_max, p_std)
    if kind == "equiprob":
        dist = dict(sigma_min=sigma_min, sigma_max=sigma_max, p_mean=p_mean, p_std=p_std)
        inner = [truncated_quantile(i / num_blocks, **dist) for i in range(1, num_blocks)]
    elif kind == "uniform_log":
        a, b = math.log(sigma_min), math.log(sigma_max)
        inner = [math.exp(a + (i / num_blocks) * (b - a)) for i in range(1, num_blocks)]
    else:
        raise ValueError(f"blocks.partition={kind!r}: must be one of {', '.join(PARTITION_KINDS)}")
    return [float(sigma_min), *inner, float(sigma_max)]


def block_range(boundaries: list[float], block: int) -> tuple[float, float]:
    """(sigma_lo, sigma_hi) of ``block``; block 0 owns the highest interval."""
    num_blocks = len(boundaries) - 1
    if not 0 <= block < num_blocks:
        raise ValueError(f"block={block}: must be in 0..{num_blocks - 1}")
    k = num_blocks - 1 - block
    return boundaries[k], boundaries[k + 1]


def widen_range(
    sigma_lo: float,
    sigma_hi: float,
    gamma: float,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> tuple[float, float]:
    """Training range with overlap gamma (Sec. 3.3): widen by gamma*Delta in log space each side.

    [exp(ln lo - gamma*Delta), exp(ln hi + gamma*Delta)], Delta = ln hi - ln lo, clipped to
    [sigma_min, sigma_max]. Inference routes by the un-widened range.
    """
    if gamma < 0:
        raise ValueError(f"blocks.gamma={gamma}: must be >= 0")
    delta = math.log(sigma_hi) - math.log(sigma_lo)
    lo = sigma_lo * math.exp(-gamma * delta)  # = exp(ln lo - gamma*Delta), exact at gamma = 0
    hi = sigma_hi * math.exp(gamma * delta)
    return max(lo, sigma_min), min(hi, sigma_max)


def sample_sigmas(
    n: int,
    sigma_lo: float,
    sigma_hi: float,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n draws of the log-normal truncated to [sigma_lo, sigma_hi], by inverse CDF (App. C).

    u ~ U(Phi(a), Phi(b)), sigma = exp(P_mean + P_std Phi^-1(u)), a and b the standardised
    log-bounds. Computed in float64, returned as float32.
    """
    a = (math.log(sigma_lo) - p_mean) / p_std
    b = (math.log(sigma_hi) - p_mean) / p_std
    qa, qb = _NORMAL.cdf(a), _NORMAL.cdf(b)
    u = qa + (qb - qa) * torch.rand(n, generator=generator, dtype=torch.float64)
    sigma = torch.exp(p_mean + p_std * torch.special.ndtri(u))
    return sigma.clamp(sigma_lo, sigma_hi).float()


def route(sigma: torch.Tensor | float, boundaries: list[float]) -> torch.Tensor:
    """Block index owning each sigma: B-1-#{interior boundaries <= sigma}.

    A sigma on an interior boundary goes to the higher-noise block; values outside
    [sigma_min, sigma_max] go to the nearest end block.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    inner = torch.tensor(boundaries[1:-1], dtype=torch.float64, device=sigma.device)
    num_blocks = len(boundaries) - 1
    return num_blocks - 1 - torch.bucketize(sigma, inner, right=True)


def inference_sigmas(
    num_steps: int,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> torch.Tensor:
    """num_steps sigmas from sigma_max down to sigma_min, equally spaced in the truncated CDF (Sec. 3.4).

    With equal-mass blocks each block is visited about num_steps/B times (17/16/17 for 50, B=3).
    """
    if num_steps < 2:
        raise ValueError(f"sample.steps={num_steps}: need at least 2 grid points")
    _check_range(sigma_min, sigma_max, p_std)
    dist = dict(sigma_min=sigma_min, sigma_max=sigma_max, p_mean=p_mean, p_std=p_std)
    n = num_steps - 1
    return torch.tensor([truncated_quantile((n - j) / n, **dist) for j in range(num_steps)], dtype=torch.float64)


def karras_sigmas(
    num_steps: int, *, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0
) -> torch.Tensor:
    """EDM's rho-spaced grid (Karras et al. 2022, Eq. 5): the end-to-end baseline's grid."""
    if num_steps < 2:
        raise ValueError(f"sample.steps={num_steps}: need at least 2 grid points")
    _check_range(sigma_min, sigma_max)
    j = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    inv = sigma_max ** (1 / rho) + j * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    sig = inv**rho
    sig[0], sig[-1] = sigma_max, sigma_min
    return sig
