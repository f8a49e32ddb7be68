"""The DiT family (paper Sec. 4.2): class-conditional images, each block a DiT on its sigma range.

The loss is Eq. 6 for images: w(sigma) mean_elements((D - x)^2) (``weighted=False``: the plain
per-sample MSE, the ablation); the end-to-end baseline is the same DiT with B = 1 on the same loss.
Inference chains the blocks through the router (Sec. 3.4): Euler over the CDF-spaced grid
(``sample.grid=auto``: EDM's rho = 7 grid for one block) with classifier-free guidance.

The metrics: held-out Eq. 6 loss over sigma ~ p and per block range, pixel-space and
classifier-feature Frechet distance between test images and samples, and the accuracy of a
classifier (trained on the data's train split) on class-conditional samples. Unlabelled data
trains and samples unconditionally (every label is the null label; no guidance, no classifier
metrics). Samples are clamped to [-1, 1].
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from ..data import ImageSplit, image_split
from ..errors import ConfigError
from ..levels import SigmaLevels
from ..loss import weighted_l2
from ..metrics import ImageClassifier, accuracy, frechet_distance, heldout_loss, train_classifier
from ..models.dit import DIT_SIZES, DiTBlock, DiTConfig, build_dit
from ..plan import BlockSpec, plan_boundaries
from ..precond import SIGMA_DATA, denoise, loss_weight
from ..sampling import BlockRouter, classifier_free_guidance, sample_euler
from .base import (
    BATCH_SIGMA,
    CHAMPION_MIN_ACCURACY,
    Array,
    Family,
    Headline,
    Row,
    WeightedLoss,
    eval_ranges,
    refuse_batch_mean,
    unit_weight,
)


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
    """Samples of ``shape`` (C, H, W), one per label, with classifier-free guidance (``null_label`` for
    every label: unconditional, no guidance), on the labels' device (the blocks' device)."""
    g = torch.Generator().manual_seed(seed)  # CPU draws, then moved: the same numbers on any device
    z = (levels.sigma_max * torch.randn((len(labels), *shape), generator=g)).to(labels.device)
    labelled = bool((labels != null_label).any())
    guided = classifier_free_guidance(router, sample.guidance_scale(labelled), null_label) if labelled else router
    grid = sample_grid(sample, levels, len(router.blocks))
    return sample_euler(guided, z, grid, extra_args={"labels": labels}).clamp(-1, 1)


def sample_labels(num_classes: int, per_class: int, null_label: int) -> torch.Tensor:
    """``per_class`` labels of each class in order; unlabelled data: 10 x ``per_class`` null labels."""
    if num_classes == 0:
        return torch.full((10 * per_class,), null_label)
    return torch.arange(num_classes).repeat_interleave(per_class)


CURVE_BINS = 16  # log-spaced sigma bins of the held-out loss curve over [sigma_min, sigma_max]


def evaluate(
    nets: Sequence[nn.Module],
    plan: Sequence[BlockSpec],
    data: ImageSplit,
    classifier: ImageClassifier | None,
    sample,
    levels: SigmaLevels,
    *,
    ranges: Sequence[tuple[float, float]],
    seed: int = 0,
) -> dict:
    """All metrics for one model; ``ranges`` are the sigma ranges for the per-range held-out loss
    (pass the DiffusionBlocks plan's ranges to the baseline too, so the rows compare). Without a
    ``classifier`` (unlabelled data) the classifier metrics are left out."""
    router = chain(nets, plan, levels.sigma_data)
    device = next(nets[0].parameters()).device  # held-out loss and sampling run there; metrics on CPU
    x, y = data.test_x.to(device), data.test_y.to(device)
    overall = heldout_loss(router, x, y, levels.sigma_min, levels.sigma_max, levels)
    per_range = [heldout_loss(router, x, y, lo, hi, levels) for lo, hi in ranges]
    edges = levels.bucket_edges(levels.sigma_min, levels.sigma_max, CURVE_BINS).tolist()
    curve = [heldout_loss(router, x, y, lo, hi, levels, repeats=2) for lo, hi in zip(edges, edges[1:])]
    null = nets[0].null_label
    labels = sample_labels(nets[0].cfg.num_classes, sample.per_class, null)
    shape = tuple(data.test_x.shape[1:])
    samples = generate(router, labels.to(device), sample, levels, shape=shape, null_label=null, seed=seed).cpu()
    out = {
        "heldout_loss": overall,
        "heldout_loss_per_range": per_range,
        "heldout_loss_curve": {"edges": edges, "loss": curve},  # the loss-vs-sigma picture
        "fd_pixel": frechet_distance(data.test_x, samples),
        "samples": samples,
        "labels": labels,
    }
    if classifier is not None:
        with torch.no_grad():
            out["fd_feature"] = frechet_distance(classifier.features(data.test_x), classifier.features(samples))
        out["sample_accuracy"] = accuracy(classifier, samples, labels)
    return out


_JUDGES: dict[str, tuple[ImageSplit, ImageClassifier | None]] = {}


def judge(data) -> tuple[ImageSplit, ImageClassifier | None]:
    """The held-out split and the classifier that judges samples, trained on the train split
    (deterministic; once per dataset and process). Unlabelled data has no classifier."""
    key = data.card.content_hash
    if key not in _JUDGES:
        split, card = image_split(data), data.card
        classifier = None
        if card.labelled:
            c, h, w = card.shape
            shape = dict(num_classes=card.num_classes, channels=c, size=(h, w))
            classifier = train_classifier(split.train_x, split.train_y, seed=0, **shape)
        _JUDGES.clear()  # one dataset at a time
        _JUDGES[key] = split, classifier
    return _JUDGES[key]


# ---- the family -----------------------------------------------------------------------------------
class DiT(Family):
    name = "dit"
    data = "digits"
    kind = "images"
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

    def predict_arrays(self, cfg: DiTConfig) -> tuple[dict[str, Array], Array]:
        image = Array(torch.float32, (None, cfg.channels, cfg.image_size, cfg.image_size))
        return {"z": image, "sigma": BATCH_SIGMA, "labels": Array(torch.int64, (None,))}, image

    def loss(self, cfg: DiTConfig, levels: SigmaLevels, *, baseline: bool, weighted: bool, **_) -> WeightedLoss:
        """Eq. 6 for a block (``weighted=False``: without w(sigma)); the baseline, the B = 1 DiT, keeps
        the weighted Eq. 6 whatever ``weighted`` says (the ablation is of the blocks)."""
        weighted = weighted or baseline
        weight = partial(loss_weight, sigma_data=levels.sigma_data) if weighted else unit_weight
        return WeightedLoss(partial(dit_loss, sigma_data=levels.sigma_data, weighted=weighted), weight)

    def check(self, run) -> None:
        refuse_batch_mean(run, "the DiT's loss is a weighted L2, not a cross-entropy")

    def generate(self, nets, plan, levels: SigmaLevels, labels: torch.Tensor, sample, *, seed: int) -> torch.Tensor:
        cfg = nets[0].cfg
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        router = chain(nets, plan, levels.sigma_data)
        labels = labels.to(next(nets[0].parameters()).device)
        return generate(router, labels, sample, levels, shape=shape, null_label=nets[0].null_label, seed=seed).cpu()

    def data_fields(self, card, run) -> dict:
        """The image shape and classes; on unlabelled images the DiT is unconditional (0 classes:
        every label is the null label), and guidance is refused."""
        fields = super().data_fields(card, run)
        if not card.labelled and run.sample.guidance not in (None, 1.0):
            raise ConfigError(
                f"sample.guidance={run.sample.guidance}: {run.data.name} is unlabelled, so the DiT "
                "samples unconditionally; remove sample.guidance (or set it to 1)"
            )
        return fields

    def evaluate(self, nets, plan, run, data, *, baseline: bool) -> dict:
        split, classifier = judge(data)
        ranges = eval_ranges(run)
        res = evaluate(nets, list(plan), split, classifier, run.sample, run.levels, ranges=ranges, seed=run.seed)
        if classifier is not None:
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
        guidance = run.sample.guidance_scale(run.model.resolved().num_classes > 0)
        return f"guidance {guidance}, {run.sample.steps} Euler grid points"
