"""Noise levels (design.md 1.2): equal-mass partition, overlap, truncated sampling, routing, grids."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks import (
    block_range,
    inference_sigmas,
    karras_sigmas,
    partition_sigmas,
    route,
    sample_sigmas,
    widen_range,
)
from helpers import P_MEAN, P_STD, PHI, SIGMA_MAX, SIGMA_MIN, binomial_tol, interval_mass, std_log, trunc_cdf


# ---- 1. partition values ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_blocks, expected",
    [
        (1, [0.002, 80.0]),
        (2, [0.002, 0.3012, 80.0]),  # design.md reference values
        (3, [0.002, 0.1796, 0.5050, 80.0]),
    ],
)
def test_partition_reference_values(num_blocks, expected):
    got = partition_sigmas(num_blocks)
    assert len(got) == num_blocks + 1
    assert got == pytest.approx(expected, rel=1e-3)
    assert got[0] == SIGMA_MIN and got[-1] == SIGMA_MAX  # the ends are exact


@pytest.mark.parametrize("kind", ["equiprob", "uniform_log"])
@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6, 8])
def test_partition_is_strictly_ascending(num_blocks, kind):
    b = partition_sigmas(num_blocks, kind=kind)
    assert all(x < y for x, y in zip(b, b[1:]))


@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6])
def test_uniform_log_has_equal_log_spacing(num_blocks):
    b = partition_sigmas(num_blocks, kind="uniform_log")
    step = (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) / num_blocks
    for i, s in enumerate(b):
        assert math.log(s) == pytest.approx(math.log(SIGMA_MIN) + i * step, abs=1e-12)


def test_partition_rejects_bad_arguments():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="blocks.num"):
            partition_sigmas(bad)
    with pytest.raises(ValueError, match="blocks.partition"):
        partition_sigmas(3, kind="cosine")
    with pytest.raises(ValueError, match="sigma_min"):
        partition_sigmas(3, sigma_min=80.0, sigma_max=0.002)


# ---- 2. equal mass per block --------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6, 8])
def test_equiprob_blocks_have_equal_mass_closed_form(num_blocks):
    b = partition_sigmas(num_blocks)
    for lo, hi in zip(b, b[1:]):
        assert interval_mass(lo, hi) == pytest.approx(1 / num_blocks, abs=1e-9)


def test_uniform_log_blocks_do_not_have_equal_mass():
    # The ablation baseline: the middle of three log-uniform blocks holds most of the mass.
    b = partition_sigmas(3, kind="uniform_log")
    masses = [interval_mass(lo, hi) for lo, hi in zip(b, b[1:])]
    assert masses[1] > 0.6 and masses[0] < 0.2 and masses[2] < 0.2


def _rejection_draws(n: int, seed: int) -> torch.Tensor:
    """Truncated log-normal by rejection, independent of the library's inverse-CDF sampler."""
    g = torch.Generator().manual_seed(seed)
    ln = P_MEAN + P_STD * torch.randn(n, generator=g, dtype=torch.float64)
    ln = ln[(ln >= math.log(SIGMA_MIN)) & (ln <= math.log(SIGMA_MAX))]
    return ln.exp()


@pytest.mark.parametrize("source", ["rejection", "sample_sigmas"])
@pytest.mark.parametrize("kind", ["equiprob", "uniform_log"])
@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_block_mass_by_monte_carlo(num_blocks, kind, source):
    n = 200_000
    if source == "rejection":
        sig = _rejection_draws(n, seed=7)
    else:
        sig = sample_sigmas(n, SIGMA_MIN, SIGMA_MAX, generator=torch.Generator().manual_seed(7)).double()
    b = partition_sigmas(num_blocks, kind=kind)
    counts = torch.bincount(route(sig, b), minlength=num_blocks)
    frac = (counts.double() / len(sig)).tolist()
    for blk in range(num_blocks):
        lo, hi = block_range(b, blk)
        p = interval_mass(lo, hi)  # 1/B for equiprob
        if kind == "equiprob":
            assert p == pytest.approx(1 / num_blocks, abs=1e-9)
        assert abs(frac[blk] - p) < binomial_tol(p, len(sig)), (blk, frac[blk], p)


# ---- block order and routing ------------------------------------------------------------------
def test_block_range_block0_owns_highest_sigma():
    b = partition_sigmas(3)
    assert block_range(b, 0) == (b[2], b[3])
    assert block_range(b, 1) == (b[1], b[2])
    assert block_range(b, 2) == (b[0], b[1])
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            block_range(b, bad)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6])
def test_route_owner_and_boundaries(num_blocks):
    b = partition_sigmas(num_blocks)
    assert route(SIGMA_MAX, b).item() == 0
    assert route(SIGMA_MIN, b).item() == num_blocks - 1
    for blk in range(num_blocks):
        lo, hi = block_range(b, blk)
        mid = math.sqrt(lo * hi)
        assert route(mid, b).item() == blk
    # Interior boundary sigma^(i), i=1..B-1, sits between block B-i (below) and B-1-i (above):
    # exactly on it -> the higher-noise block; one ulp below -> the lower-noise block.
    for i in range(1, num_blocks):
        s = b[i]
        assert route(s, b).item() == num_blocks - 1 - i
        assert route(math.nextafter(s, 0.0), b).item() == num_blocks - i
        assert route(math.nextafter(s, math.inf), b).item() == num_blocks - 1 - i


def test_route_is_elementwise_and_clamps_outside_range():
    b = partition_sigmas(3)
    sig = torch.tensor([100.0, 80.0, 1.0, 0.3, 0.1, 0.002, 1e-4], dtype=torch.float64)
    assert route(sig, b).tolist() == [0, 0, 0, 1, 2, 2, 2]


# ---- 3. overlap gamma ---------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1, 0.3])
def test_widen_range_closed_form(gamma):
    b = partition_sigmas(3)
    for blk in range(3):
        lo, hi = block_range(b, blk)
        delta = math.log(hi) - math.log(lo)
        wlo, whi = widen_range(lo, hi, gamma)
        exp_lo = max(SIGMA_MIN, lo * math.exp(-gamma * delta))
        exp_hi = min(SIGMA_MAX, hi * math.exp(gamma * delta))
        assert wlo == pytest.approx(exp_lo, rel=1e-12)
        assert whi == pytest.approx(exp_hi, rel=1e-12)
        assert SIGMA_MIN <= wlo <= lo and hi <= whi <= SIGMA_MAX


def test_widen_range_log_widths_and_clipping():
    b = partition_sigmas(3)
    # Middle block: not clipped, each side grows by exactly gamma*Delta in log space.
    lo, hi = block_range(b, 1)
    wlo, whi = widen_range(lo, hi, 0.05)
    delta = math.log(hi / lo)
    assert math.log(lo / wlo) == pytest.approx(0.05 * delta, rel=1e-9)
    assert math.log(whi / hi) == pytest.approx(0.05 * delta, rel=1e-9)
    # End blocks are clipped to the model's range on their outer side.
    assert widen_range(*block_range(b, 0), 0.05)[1] == SIGMA_MAX
    assert widen_range(*block_range(b, 2), 0.05)[0] == SIGMA_MIN
    # Custom clip range.
    assert widen_range(0.1, 1.0, 1.0, sigma_min=0.05, sigma_max=2.0) == (0.05, 2.0)


def test_widen_range_gamma_zero_is_identity_and_negative_raises():
    b = partition_sigmas(4)
    for blk in range(4):
        lo, hi = block_range(b, blk)
        # gamma = 0 (the no-overlap ablation) trains on exactly the routing range.
        assert widen_range(lo, hi, 0.0) == (lo, hi)
    with pytest.raises(ValueError, match="gamma"):
        widen_range(0.1, 1.0, -0.01)


# ---- 4. sampling within a range -----------------------------------------------------------------
def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    x = samples.double().sort().values.tolist()
    n = len(x)
    d = 0.0
    for i, v in enumerate(x):
        f = cdf(v)
        d = max(d, (i + 1) / n - f, f - i / n)
    return d


@pytest.mark.parametrize(
    "lo, hi",
    [(0.002, 80.0), (0.002, 0.1796), (0.1796, 0.5050), (0.5050, 80.0), (0.002, 0.003), (40.0, 80.0)],
)
def test_sample_sigmas_bounds_and_distribution(lo, hi):
    n = 20_000
    sig = sample_sigmas(n, lo, hi, generator=torch.Generator().manual_seed(3))
    assert sig.shape == (n,) and sig.dtype == torch.float32
    assert bool((sig >= torch.tensor(lo, dtype=torch.float32)).all())
    assert bool((sig <= torch.tensor(hi, dtype=torch.float32)).all())
    # Kolmogorov-Smirnov against the closed-form truncated CDF; 1.95/sqrt(n) is the
    # alpha=1e-3 critical value (sqrt(-ln(alpha/2)/2) = 1.949).
    d = _ks_statistic(sig, lambda s: min(1.0, max(0.0, trunc_cdf(s, lo, hi))))
    assert d < 1.95 / math.sqrt(n), d
    # Median of the truncated law: exp(P_mean + P_std Phi^-1((Phi(a)+Phi(b))/2)).
    q = (PHI.cdf(std_log(lo)) + PHI.cdf(std_log(hi))) / 2
    median = math.exp(P_MEAN + P_STD * PHI.inv_cdf(q))
    frac_below = (sig.double() < median).double().mean().item()
    assert abs(frac_below - 0.5) < binomial_tol(0.5, n)


def test_sample_sigmas_is_reproducible_from_the_generator():
    a = sample_sigmas(100, 0.1, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample_sigmas(100, 0.1, 1.0, generator=torch.Generator().manual_seed(5))
    c = sample_sigmas(100, 0.1, 1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- inference grids ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [2, 3, 10, 50])
def test_inference_sigmas_equally_spaced_in_truncated_cdf(num_steps):
    s = inference_sigmas(num_steps)
    assert s.shape == (num_steps,) and s.dtype == torch.float64
    assert s[0].item() == SIGMA_MAX and s[-1].item() == SIGMA_MIN
    assert bool((s[1:] < s[:-1]).all())
    for j, v in enumerate(s.tolist()):
        assert trunc_cdf(v) == pytest.approx(1 - j / (num_steps - 1), abs=1e-9)


def test_grids_reject_fewer_than_two_points():
    with pytest.raises(ValueError, match="sample.steps"):
        inference_sigmas(1)
    with pytest.raises(ValueError, match="sample.steps"):
        karras_sigmas(1)


@pytest.mark.parametrize("num_steps", [2, 18, 50])
def test_karras_sigmas_closed_form(num_steps):
    rho = 7.0
    s = karras_sigmas(num_steps)
    assert s[0].item() == SIGMA_MAX and s[-1].item() == SIGMA_MIN
    for j, v in enumerate(s.tolist()):
        t = j / (num_steps - 1)
        exp = (SIGMA_MAX ** (1 / rho) + t * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
        assert v == pytest.approx(exp, rel=1e-12)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_inference_grid_points_on_boundaries_go_to_the_higher_noise_block(num_blocks, k):
    """N = kB+1 grid points put (in exact arithmetic) one grid point on every interior boundary,
    because both the grid and the boundaries are equally spaced in the truncated CDF.
    The boundary rule then gives block 0 k+1 points and every other block k."""
    n = k * num_blocks + 1
    owners = route(inference_sigmas(n), partition_sigmas(num_blocks))
    counts = torch.bincount(owners, minlength=num_blocks).tolist()
    assert counts == [k + 1] + [k] * (num_blocks - 1)
