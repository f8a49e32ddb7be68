"""Evaluate a trained model: ``evaluate_model`` for any family; the DiT's digits metrics here.

The DiT's metrics (issue: core, point 6): held-out Eq. 6 loss over sigma ~ p and per block range,
pixel-space and classifier-feature Frechet distance between test images and samples, and the
classifier's accuracy on class-conditional samples. Samples are clamped to [-1, 1].
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn as nn

from .build import block_denoiser, eval_ranges
from .config import NoiseConfig, SampleConfig
from .data import ImageSplit, load_digits_split
from .metrics import DigitsClassifier, accuracy, frechet_distance, heldout_loss, train_digits_classifier
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


# ---- every family: one entry point for the sampler actor, the benchmark and the tests ----------
ROWS: dict[str, list[tuple[str, str, str]]] = {  # family -> (label, result key, format) of the results table
    "dit": [
        ("held-out loss, sigma ~ p", "heldout_loss", "{:.4f}"),
        ("FD pixel", "fd_pixel", "{:.3f}"),
        ("FD classifier features", "fd_feature", "{:.3f}"),
        ("classifier acc. on samples", "sample_accuracy", "{:.1%}"),
    ],
    "vit": [("test accuracy", "test_accuracy", "{:.2%}")],
    "ar": [
        ("val CE at sigma_min (nats/char)", "val_ce", "{:.3f}"),
        ("val CE at sigma_max (nats/char)", "val_ce_sigma_max", "{:.3f}"),
        ("val next-char accuracy", "val_accuracy", "{:.1%}"),
    ],
    "mdm": [("test bits per character (ELBO)", "test_bpc", "{:.3f}")],
    "recurrent": [
        ("val loss (nats/char)", "val_loss", "{:.3f}"),
        ("val bits per character", "val_bpc", "{:.3f}"),
        ("val next-char accuracy", "val_accuracy", "{:.1%}"),
    ],
}


@functools.lru_cache(maxsize=2)
def digits_judge(test_size: int, split_seed: int) -> tuple[ImageSplit, DigitsClassifier]:
    """The digits split and the classifier that judges samples (deterministic; trained once per process)."""
    split = load_digits_split(test_size, split_seed)
    return split, train_digits_classifier(split.train_x, split.train_y, seed=0)


def evaluate_model(nets: Sequence[nn.Module], plan: Sequence[BlockSpec], cfg, *, baseline: bool) -> dict:
    """The family's metrics for one trained model: B blocks, or ``[baseline net]`` with ``baseline``.

    ``cfg`` is the run's RunConfig; data come from the built-in sources (``cfg.data``)."""
    fam, n, plan = cfg.model.family, cfg.noise, list(plan)
    shape = dict(p_mean=n.p_mean, p_std=n.p_std, sigma_data=n.sigma_data)  # the training density
    noise = dict(sigma_min=n.sigma_min, sigma_max=n.sigma_max, **shape)
    if fam == "dit":
        split, classifier = digits_judge(cfg.data.test_size, cfg.data.split_seed)
        res = evaluate(nets, plan, split, classifier, cfg.sample, n, ranges=eval_ranges(cfg), seed=cfg.seed)
        res["classifier_test_accuracy"] = accuracy(classifier, split.test_x, split.test_y)  # the judge itself
        return res
    if fam == "vit":
        from .models.vit import evaluate_vit

        split = load_digits_split(cfg.data.test_size, cfg.data.split_seed)
        return evaluate_vit(list(nets), plan, split, baseline=baseline, seed=cfg.seed, **noise)
    from .text import load_text_split

    split = load_text_split(cfg.model.resolved().seq_len, cfg.data.split_seed)
    if fam == "ar":
        from .models.ar import evaluate_ar

        return evaluate_ar(list(nets), plan, split, baseline=baseline, seed=cfg.seed, **noise)
    if fam == "mdm":
        from .models.mdm import evaluate_mdm

        return evaluate_mdm(list(nets), plan, split, baseline=baseline, seed=cfg.seed)
    from .models.recurrent import evaluate_recurrent

    return evaluate_recurrent(list(nets), plan, split, baseline=baseline, seed=cfg.seed, **shape)


def passes(cfg, results: dict) -> bool:
    """Whether a set earns the registry's ``champion`` alias (``registry.*`` thresholds)."""
    fam, r = cfg.model.family, cfg.registry
    if fam in ("dit", "vit"):
        return results["sample_accuracy" if fam == "dit" else "test_accuracy"] >= r.champion_min_accuracy
    return bits_per_char(cfg, results) <= r.champion_max_bpc


def bits_per_char(cfg, results: dict) -> float:
    """A text family's headline figure in bits per character."""
    fam = cfg.model.family
    if fam == "mdm":
        return results["test_bpc"]
    return results["val_ce" if fam == "ar" else "val_loss"] / math.log(2)
