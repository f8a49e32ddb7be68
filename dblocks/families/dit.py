"""The DiT family (paper Sec. 4.2): class-conditional digits, each block a DiT on its sigma range.

The loss is Eq. 6 for images: w(sigma) mean_elements((D - x)^2) (``weighted=False``: the plain
per-sample MSE, the ablation); the end-to-end baseline is the same DiT with B = 1 on the same loss.
Inference chains the blocks through the router (Sec. 3.4): Euler over the CDF-spaced grid
(``sample.grid=auto``: EDM's rho = 7 grid for one block) with classifier-free guidance.

The metrics: held-out Eq. 6 loss over sigma ~ p and per block range, pixel-space and
classifier-feature Frechet distance between test images and samples, and the accuracy of a
digits classifier on class-conditional samples. Samples are clamped to [-1, 1].
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from ..data import ImageSplit, load_digits_split
from ..levels import SigmaLevels
from ..loss import weighted_l2
from ..metrics import DigitsClassifier, accuracy, frechet_distance, heldout_loss, train_digits_classifier
from ..models.dit import DIT_SIZES, DiTBlock, DiTConfig, build_dit
from ..plan import BlockSpec, plan_boundaries
from ..precond import SIGMA_DATA, denoise
from ..sampling import BlockRouter, classifier_free_guidance, sample_euler
from .base import CHAMPION_MIN_ACCURACY, Family, Headline, LossFn, Row, eval_ranges


# ---- loss -----------------------------------------------------------------------------------------
def dit_loss(
    net: DiTBlock,
    batch: tuple[torch.Tensor, torch.Tensor],
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
    *,
    weighted: bool = True,
) -> torch.Tensor:
    """Per-sample Eq. 6 loss for one block: noise the image, drop labels for CFG, weighted L2
    (``weighted=False``: mean_elements((D - x)^2), Eq. 6 without w(sigma))."""
    images, labels = batch
    # Random draws come from the (CPU) generator, then move: the same numbers on any device.
    eps = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    z = images + sigma.reshape(-1, 1, 1, 1) * eps
    drop = (torch.rand(labels.shape, generator=generator) < net.cfg.label_dropout).to(labels.device)
    labels = torch.where(drop, torch.full_like(labels, net.null_label), labels)
    denoised = denoise(net, z, sigma, labels, sigma_data=sigma_data)
    if weighted:
        return weighted_l2(denoised, images, sigma, sigma_data)
    return (denoised - images).square().flatten(1).mean(1)


# ---- inference ------------------------------------------------------------------------------------
def block_denoiser(net: nn.Module, sigma_data: float = SIGMA_DATA):
    """D(z, sigma, **cond) for a trained DiT block (EDM preconditioning around it)."""
    return partial(denoise, net.eval(), sigma_data=sigma_data)


def chain(nets: Sequence[nn.Module], plan: Sequence[BlockSpec], sigma_data: float = SIGMA_DATA) -> BlockRouter:
    """The B blocks as one denoiser, routed by the plan's un-widened ranges."""
    return BlockRouter([block_denoiser(n, sigma_data) for n in nets], plan_boundaries(list(plan)))


def sample_grid(sample, levels: SigmaLevels, num_blocks: int) -> torch.Tensor:
    """The inference grid: CDF-spaced for DiffusionBlocks, EDM's rho=7 for the baseline ("auto")."""
    kind = sample.grid if sample.grid != "auto" else ("cdf" if num_blocks > 1 else "karras")
    return levels.karras(sample.steps) if kind == "karras" else levels.grid(sample.steps)


@torch.no_grad()
def generate(
    router: BlockRouter,
    labels: torch.Tensor,
    sample,
    levels: SigmaLevels,
    *,
    shape: tuple[int, ...],
    null_label: int,
    seed: int = 0,
) -> torch.Tensor:
    """Class-conditional samples of ``shape`` (C, H, W) with classifier-free guidance ``sample.guidance``."""
    g = torch.Generator().manual_seed(seed)
    z = levels.sigma_max * torch.randn((len(labels), *shape), generator=g)
    guided = classifier_free_guidance(router, sample.guidance, null_label)
    grid = sample_grid(sample, levels, len(router.blocks))
    return sample_euler(guided, z, grid, extra_args={"labels": labels}).clamp(-1, 1)


def evaluate(
    nets: Sequence[nn.Module],
    plan: Sequence[BlockSpec],
    data: ImageSplit,
    classifier: DigitsClassifier,
    sample,
    levels: SigmaLevels,
    *,
    ranges: Sequence[tuple[float, float]],
    seed: int = 0,
) -> dict:
    """All metrics for one model; ``ranges`` are the sigma ranges for the per-range held-out loss
    (pass the DiffusionBlocks plan's ranges to the baseline too, so the rows compare)."""
    router = chain(nets, plan, levels.sigma_data)
    x, y = data.test_x, data.test_y
    overall = heldout_loss(router, x, y, levels.sigma_min, levels.sigma_max, levels)
    per_range = [heldout_loss(router, x, y, lo, hi, levels) for lo, hi in ranges]
    labels = torch.arange(10).repeat_interleave(sample.per_class)
    shape = tuple(data.test_x.shape[1:])
    samples = generate(router, labels, sample, levels, shape=shape, null_label=nets[0].null_label, seed=seed)
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


@functools.lru_cache(maxsize=2)
def digits_judge(test_size: int, split_seed: int) -> tuple[ImageSplit, DigitsClassifier]:
    """The digits split and the classifier that judges samples (deterministic; trained once per process)."""
    split = load_digits_split(test_size, split_seed)
    return split, train_digits_classifier(split.train_x, split.train_y, seed=0)


# ---- the family -----------------------------------------------------------------------------------
class DiT(Family):
    name = "dit"
    data = "digits"
    config = DiTConfig
    sizes = DIT_SIZES
    baseline_is_denoiser = True  # the end-to-end baseline is the same DiT with B = 1
    rows = (
        Row("held-out loss, sigma ~ p", "heldout_loss", "{:.4f}"),
        Row("FD pixel", "fd_pixel", "{:.3f}"),
        Row("FD classifier features", "fd_feature", "{:.3f}"),
        Row("classifier acc. on samples", "sample_accuracy", "{:.1%}"),
    )
    headline = Headline("sample_accuracy", higher_is_better=True, threshold=CHAMPION_MIN_ACCURACY)

    build = staticmethod(build_dit)
    make_denoiser = staticmethod(block_denoiser)

    def loss(self, cfg: DiTConfig, levels: SigmaLevels, *, baseline: bool, weighted: bool) -> LossFn:
        """Eq. 6 for a block (``weighted=False``: without w(sigma)); the baseline, the B = 1 DiT, keeps
        the weighted Eq. 6 whatever ``weighted`` says (the ablation is of the blocks)."""
        return partial(dit_loss, sigma_data=levels.sigma_data, weighted=weighted or baseline)

    def generate(self, nets, plan, levels: SigmaLevels, labels: torch.Tensor, sample, *, seed: int) -> torch.Tensor:
        cfg = nets[0].cfg
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        router = chain(nets, plan, levels.sigma_data)
        return generate(router, labels, sample, levels, shape=shape, null_label=nets[0].null_label, seed=seed)

    def evaluate(self, nets, plan, run, *, baseline: bool) -> dict:
        split, classifier = digits_judge(run.data.test_size, run.data.split_seed)
        ranges = eval_ranges(run)
        res = evaluate(nets, list(plan), split, classifier, run.sample, run.levels, ranges=ranges, seed=run.seed)
        res["classifier_test_accuracy"] = accuracy(classifier, split.test_x, split.test_y)  # the judge itself
        return res

    def table_rows(self, run) -> list[Row]:
        """The metrics, then the held-out loss per range of the DiffusionBlocks plan."""
        per_range = [
            Row(f"held-out loss, block {i} [{lo:.3g}, {hi:.3g}]", "heldout_loss_per_range", "{:.4f}", index=i)
            for i, (lo, hi) in enumerate(eval_ranges(run))
        ]
        return [*self.rows, *per_range]

    def summary(self, run) -> str:
        return f"guidance {run.sample.guidance}, {run.sample.steps} Euler grid points"
