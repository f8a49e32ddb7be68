"""Euler sampler, BlockRouter and classifier-free guidance (design.md 1.4)."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks import (
    BlockRouter,
    DiTBlock,
    SigmaLevels,
    classifier_free_guidance,
    denoise,
    euler_step,
    inference_sigmas,
    karras_sigmas,
    make_plan,
    partition_sigmas,
    plan_boundaries,
    sample_euler,
    seeded,
)
from helpers import SIGMA_MAX

LEVELS = SigmaLevels()


# ---- 6. Euler step with an oracle denoiser ------------------------------------------------------
@pytest.mark.parametrize("sigma, sigma_next", [(80.0, 40.0), (1.0, 0.5), (0.5050, 0.1796), (0.01, 0.002)])
def test_euler_step_with_oracle_denoiser_moves_along_the_noise_direction(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    z = y + sigma * eps
    out = euler_step(z, y, sigma, sigma_next)  # oracle D(z, sigma) = y
    torch.testing.assert_close(out, y + sigma_next * eps, rtol=0, atol=1e-12 * max(1.0, sigma))


def test_sample_euler_with_oracle_denoiser_follows_y_plus_sigma_eps_and_returns_y():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    grid = inference_sigmas(20)
    seen = []

    def oracle(z, sigma):
        assert sigma.shape == (3,)
        seen.append((float(sigma[0]), z.clone()))
        return y

    steps = []
    out = sample_euler(oracle, SIGMA_MAX * eps + y, grid, callback=lambda i, s, d: steps.append((i, s)))
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    assert len(seen) == len(grid)  # one call per grid point, the last one the final denoise
    assert steps == [(i, float(s)) for i, s in enumerate(grid[:-1])]
    for (s_seen, z), s in zip(seen, grid.tolist()):
        assert s_seen == pytest.approx(s, rel=1e-6)
        torch.testing.assert_close(z, y + s * eps, rtol=0, atol=1e-9)


def _gaussian_denoiser(mu: float, s0: float):
    """Exact denoiser for data y ~ N(mu, s0^2) per element: E[y | z] = mu + s0^2/(s0^2+sigma^2)(z-mu)."""

    def d(z, sigma):
        v = sigma.double().reshape(-1, *([1] * (z.ndim - 1)))
        return mu + s0**2 / (s0**2 + v**2) * (z - mu)

    return d


@pytest.mark.parametrize("grid_fn", [inference_sigmas, karras_sigmas])
def test_sample_euler_matches_the_discrete_closed_form_for_gaussian_data(grid_fn):
    """For a linear denoiser every Euler step multiplies (z - mu) by 1 + (s' - s) s/(s0^2 + s^2)."""
    mu, s0 = 0.3, 0.5
    g = torch.Generator().manual_seed(2)
    z0 = SIGMA_MAX * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    grid = grid_fn(12).tolist()
    factor = 1.0
    for s, s_next in zip(grid[:-1], grid[1:]):
        factor *= 1 + (s_next - s) * s / (s0**2 + s**2)
    factor *= s0**2 / (s0**2 + grid[-1] ** 2)  # final denoise
    out = sample_euler(_gaussian_denoiser(mu, s0), z0, torch.tensor(grid, dtype=torch.float64))
    # The denoiser sees sigma as passed by the sampler; allow float32-level relative error.
    torch.testing.assert_close(out, mu + factor * (z0 - mu), rtol=1e-5, atol=1e-9)


def test_sample_euler_converges_to_the_probability_flow_ode_solution():
    """Exact PF-ODE solution for Gaussian data: z(s) - mu = (z(s_max) - mu) sqrt(s0^2+s^2)/sqrt(s0^2+s_max^2).
    Euler is first order: 10x the steps cut the global error by ~10x (a sign error or a skipped
    step would not converge at all; a second-order step would give ~100x)."""
    mu, s0 = -0.2, 0.5
    z0 = torch.full((1, 1, 2, 2), 1.0, dtype=torch.float64) * SIGMA_MAX
    errors = []
    for n in (50, 500):
        grid = karras_sigmas(n)
        s_end = grid[-1].item()
        exact_z = mu + (z0 - mu) * math.sqrt(s0**2 + s_end**2) / math.sqrt(s0**2 + SIGMA_MAX**2)
        exact = mu + s0**2 / (s0**2 + s_end**2) * (exact_z - mu)
        out = sample_euler(_gaussian_denoiser(mu, s0), z0, grid)
        errors.append((out - exact).abs().max().item())
    assert 8.0 < errors[0] / errors[1] < 12.0, errors
    assert errors[1] < 1e-2  # 1% of the O(0.3) answer at 500 steps


# ---- 7. BlockRouter ---------------------------------------------------------------------------
def _recording_blocks(num_blocks: int):
    """Toy block denoisers: block b returns b + 0*z and records the sigmas it was asked about."""
    seen = {b: [] for b in range(num_blocks)}

    def make(b):
        def block(z, sigma, **extra):
            seen[b].extend(sigma.double().tolist())
            return torch.full_like(z, float(b))

        return block

    return [make(b) for b in range(num_blocks)], seen


def test_block_usage_is_17_16_17_for_50_steps_at_b3():
    boundaries = partition_sigmas(3)
    blocks, seen = _recording_blocks(3)
    router = BlockRouter(blocks, boundaries)
    sample_euler(router, SIGMA_MAX * torch.randn(2, 1, 8, 8), inference_sigmas(50))
    assert dict(router.calls) == {0: 17, 1: 16, 2: 17}  # design.md 1.4
    # Each block was only asked about sigmas in its own (un-widened) range.
    for b, (lo, hi) in enumerate(
        [(boundaries[2], boundaries[3]), (boundaries[1], boundaries[2]), (boundaries[0], boundaries[1])]
    ):
        assert seen[b] and all(lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6) for s in seen[b])


@pytest.mark.parametrize("num_blocks, num_steps", [(2, 3), (3, 7), (2, 21), (4, 9)])
def test_chained_sampling_sends_on_boundary_grid_points_to_the_higher_noise_block(num_blocks, num_steps):
    """With N-1 = kB, the CDF-equispaced grid puts one point on each interior boundary
    (design.md 1.2: such a sigma belongs to the higher-noise block): block 0 is used k+1 times,
    every other block k times."""
    k = (num_steps - 1) // num_blocks
    blocks, _ = _recording_blocks(num_blocks)
    router = BlockRouter(blocks, partition_sigmas(num_blocks))
    sample_euler(router, SIGMA_MAX * torch.randn(1, 1, 8, 8), inference_sigmas(num_steps))
    assert [router.calls[b] for b in range(num_blocks)] == [k + 1] + [k] * (num_blocks - 1)


def test_router_sends_each_sample_to_its_owner_and_slices_extra_args():
    boundaries = partition_sigmas(3)
    labels_seen = {}

    def make(b):
        def block(z, sigma, labels):
            labels_seen[b] = labels.tolist()
            return z * 0 + 100 * b + labels.to(z.dtype)[:, None]

        return block

    router = BlockRouter([make(b) for b in range(3)], boundaries)
    sigma = torch.tensor([80.0, 0.002, boundaries[2], 0.3, boundaries[1], 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out = router(torch.zeros(6, 2, dtype=torch.float64), sigma, labels=labels)
    owners = [0, 2, 0, 1, 1, 0]  # boundary values go to the higher-noise block
    assert out[:, 0].tolist() == [100.0 * b + i for i, b in enumerate(owners)]
    assert labels_seen == {0: [0, 2, 5], 1: [3, 4], 2: [1]}
    assert dict(router.calls) == {0: 1, 1: 1, 2: 1}


def test_router_rejects_block_count_mismatch():
    with pytest.raises(ValueError):
        BlockRouter([lambda z, s: z] * 2, partition_sigmas(3))


# ---- 8. classifier-free guidance ----------------------------------------------------------------
def _toy_conditional(null_label: int):
    calls = []

    def d(z, sigma, labels):
        calls.append(labels.clone())
        return z * (labels.to(z.dtype) + 1)[:, None] / 7 + sigma[:, None] + (labels == null_label).to(z.dtype)[:, None]

    return d, calls


def test_cfg_scale_one_is_the_conditional_denoiser():
    d, _ = _toy_conditional(10)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 5.0, 80.0], dtype=torch.float64)
    labels = torch.tensor([0, 4, 9, 2])
    assert torch.equal(classifier_free_guidance(d, 1.0, 10)(z, sigma, labels), d(z, sigma, labels))


@pytest.mark.parametrize("scale", [0.0, 1.5, 2.0, 4.0])
def test_cfg_is_uncond_plus_scale_times_difference(scale):
    d, calls = _toy_conditional(10)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 5.0, 80.0], dtype=torch.float64)
    labels = torch.tensor([0, 4, 9, 2])
    cond = d(z, sigma, labels)
    uncond = d(z, sigma, torch.full_like(labels, 10))
    calls.clear()
    out = classifier_free_guidance(d, scale, 10)(z, sigma, labels)
    torch.testing.assert_close(out, uncond + scale * (cond - uncond), rtol=1e-12, atol=1e-12)
    # One batched call whose second half carries the null label.
    assert len(calls) == 1 and calls[0].tolist() == [0, 4, 9, 2, 10, 10, 10, 10]


def test_chained_dit_blocks_with_guidance_sample_end_to_end(debug_cfg):
    """Real debug-size DiT blocks, chained by the router under CFG: one call per block per grid point."""
    plan = make_plan(LEVELS, 3, debug_cfg.layers, gamma=0.05)
    nets = []
    for spec in plan:
        with seeded(100 + spec.index):
            net = DiTBlock(debug_cfg, spec.num_layers).eval()
        with torch.no_grad():  # leave the zero init so the output is not trivially c_skip z
            for p in net.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(spec.index)))
        nets.append(net)
    blocks = [lambda z, s, labels, net=net: denoise(net, z, s, labels) for net in nets]
    router = BlockRouter(blocks, plan_boundaries(plan))
    guided = classifier_free_guidance(router, 2.0, debug_cfg.num_classes)
    z = SIGMA_MAX * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = sample_euler(guided, z, inference_sigmas(50), extra_args={"labels": torch.tensor([0, 1, 2, 3])})
    assert out.shape == (4, 1, 8, 8) and bool(torch.isfinite(out).all())
    assert dict(router.calls) == {0: 17, 1: 16, 2: 17}
