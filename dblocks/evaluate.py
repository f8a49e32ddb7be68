"""Evaluate a set of trained blocks (or the end-to-end model, B=1) on the digits task.

Metrics (issue: core, point 6): held-out Eq. 6 loss over sigma ~ p and per block range,
pixel-space and classifier-feature Frechet distance between test images and samples, and the
classifier's accuracy on class-conditional samples. Samples are clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .build import block_denoiser
from .config import NoiseConfig, SampleConfig
from .data import ImageSplit
from .metrics import DigitsClassifier, accuracy, frechet_distance, heldout_loss
from .noise import inference_sigmas, karras_sigmas
from .plan import BlockSpec, plan_boundaries
from .sampling import BlockRouter, classifier_free_guidance, sample_euler


def chain(nets: Sequence[nn.Module], plan: Sequence[BlockSpec], sigma_data: float = 0.5) -> BlockRouter:
    """The B blocks as one denoiser, routed by the plan's un-widened ranges."""
    return BlockRouter([block_denoiser(n, sigma_data) for n in nets], plan_boundaries(list(plan)))


def sample_grid(sample: SampleConfig, noise: NoiseConfig, num_blocks: int) -> torch.Tensor:
    """The inference grid: CDF-spaced for DiffusionBlocks, EDM's rho=7 for the baseline ("auto")."""
    kind = sample.grid if sample.grid != "auto" else ("cdf" if num_blocks > 1 else "karras")
    if kind == "karras":
        return karras_sigmas(sample.steps, sigma_min=noise.sigma_min, sigma_max=noise.sigma_max)
    return inference_sigmas(
        sample.steps, sigma_min=noise.sigma_min, sigma_max=noise.sigma_max, p_mean=noise.p_mean, p_std=noise.p_std
    )


@torch.no_grad()
def generate(
    router: BlockRouter,
    labels: torch.Tensor,
    sample: SampleConfig,
    noise: NoiseConfig,
    *,
    shape: tuple[int, ...],
    null_label: int,
    seed: int = 0,
) -> torch.Tensor:
    """Class-conditional samples of ``shape`` (C, H, W) with classifier-free guidance ``sample.guidance``."""
    g = torch.Generator().manual_seed(seed)
    z = noise.sigma_max * torch.randn((len(labels), *shape), generator=g)
    guided = classifier_free_guidance(router, sample.guidance, null_label)
    grid = sample_grid(sample, noise, len(router.blocks))
    return sample_euler(guided, z, grid, extra_args={"labels": labels}).clamp(-1, 1)


def evaluate(
    nets: Sequence[nn.Module],
    plan: Sequence[BlockSpec],
    data: ImageSplit,
    classifier: DigitsClassifier,
    sample: SampleConfig,
    noise: NoiseConfig,
    *,
    ranges: Sequence[tuple[float, float]],
    seed: int = 0,
) -> dict:
    """All metrics for one model; ``ranges`` are the sigma ranges for the per-range held-out loss
    (pass the DiffusionBlocks plan's ranges to the baseline too, so the rows compare)."""
    router = chain(nets, plan, noise.sigma_data)
    kw = dict(p_mean=noise.p_mean, p_std=noise.p_std, sigma_data=noise.sigma_data)
    overall = heldout_loss(router, data.test_x, data.test_y, noise.sigma_min, noise.sigma_max, **kw)
    per_range = [heldout_loss(router, data.test_x, data.test_y, lo, hi, **kw) for lo, hi in ranges]
    labels = torch.arange(10).repeat_interleave(sample.per_class)
    shape = tuple(data.test_x.shape[1:])
    samples = generate(router, labels, sample, noise, shape=shape, null_label=nets[0].null_label, seed=seed)
    with torch.no_grad():
        fd_feat = frechet_distance(classifier.features(data.test_x), classifier.features(samples))
    return {
        "heldout_loss": overall,
        "heldout_loss_per_range": per_range,
        "fd_pixel": frechet_distance(data.test_x, samples),
        "fd_feature": fd_feat,
        "sample_accuracy": accuracy(classifier, samples, labels),
        "samples": samples,
        "labels": labels,
    }
