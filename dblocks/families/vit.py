"""The ViT family (design.md 1.5; paper Sec. 4.1): digits classification as DiffusionBlocks.

A block denoises the noisy label embedding z = E[y] + sigma eps given the image; its loss is
Eq. 6 for a discrete target, w(sigma) CE(logits, y) (``weighted=False``: plain CE, the ablation).
The end-to-end baseline is a plain ViT classifier on plain CE (``weighted`` does not apply).

Inference chains the B blocks with B CDF-spaced Euler grid points (Sec. 3.4): one call per block,
so B blocks of L/B layers cost one pass of the L-layer baseline; the argmax of the final call's
logits is the prediction.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CeWeighting
from ..data import ImageSplit, image_split
from ..errors import ConfigError
from ..levels import SigmaLevels
from ..models.vit import VIT_SIZES, ViTBaseline, ViTBlock, ViTConfig, build_vit
from ..plan import BlockSpec, plan_boundaries
from ..precond import SIGMA_DATA
from ..sampling import BlockRouter
from .base import BATCH_SIGMA, CHAMPION_MIN_ACCURACY, Array, Family, Headline, Row
from .discrete import DiscreteDenoiser, chain_logits, discrete_loss


# ---- losses ---------------------------------------------------------------------------------------
def noisy_label(table: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = E[y] + sigma eps (design.md 1.1), (N, D)."""
    return table[labels] + sigma[:, None].to(eps.dtype) * eps


def vit_loss(
    net: ViTBlock,
    batch: tuple,
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data=SIGMA_DATA,
    *,
    weighted=True,
    ce_weighting: str = CeWeighting.per_sample,
) -> torch.Tensor:
    """Per-sample Eq. 6 loss: w(sigma) CE(block(x, E[y] + sigma eps, sigma), y), (N,);
    ``weighted=False``: the plain CE (Eq. 6 without w(sigma)); ``ce_weighting``: :func:`~.discrete.ce_weight`."""
    images, labels = batch
    table = net.label_table
    eps = torch.randn((len(labels), table.shape[1]), generator=generator, dtype=table.dtype).to(table.device)
    logits = net(noisy_label(table, labels, sigma, eps), sigma, images, sigma_data=sigma_data)
    return discrete_loss(logits, labels, sigma, sigma_data, weighted=weighted, ce_weighting=ce_weighting)


def vit_baseline_loss(
    net: ViTBaseline, batch: tuple[torch.Tensor, torch.Tensor], sigma: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Plain per-sample cross-entropy of the end-to-end ViT, (N,); sigma and generator are unused."""
    images, labels = batch
    return F.cross_entropy(net(images), labels, reduction="none")


# ---- inference ------------------------------------------------------------------------------------
def vit_denoiser(net: ViTBlock, sigma_data: float = SIGMA_DATA) -> DiscreteDenoiser:
    """D(z, sigma, images) = softmax(logits) @ E (design.md 1.4, discrete targets)."""
    return DiscreteDenoiser(partial(net.eval(), sigma_data=sigma_data), net.label_table)


class ViTPrediction(NamedTuple):
    labels: torch.Tensor  # (N,) argmax of the final logits
    logits: torch.Tensor  # (N, K) logits of the final call (at sigma_min)
    router: BlockRouter | None  # the router used (router.calls counts calls per block); None for the baseline


@torch.no_grad()
def predict_vit(
    nets: Sequence[ViTBlock],
    plan: Sequence[BlockSpec],
    images: torch.Tensor,
    levels: SigmaLevels,
    *,
    steps: int | None = None,
    seed: int = 0,
) -> ViTPrediction:
    """Chain the B blocks (design.md 1.4): z ~ N(0, sigma_max^2 I), Euler over ``steps`` (default B)
    CDF-spaced grid points, i.e. one call per block for B >= 2; predict argmax of the final logits.

    With ``steps=1`` (the natural choice for B=1) the grid is the single point sigma_max.
    """
    steps = len(nets) if steps is None else steps
    grid = torch.tensor([levels.sigma_max], dtype=torch.float64) if steps == 1 else levels.grid(steps)
    g = torch.Generator().manual_seed(seed)
    z = (levels.sigma_max * torch.randn((len(images), nets[0].cfg.width), generator=g)).to(images.device)
    denoisers = [vit_denoiser(net, levels.sigma_data) for net in nets]
    out = chain_logits(denoisers, plan_boundaries(list(plan)), z, grid, images=images)
    return ViTPrediction(out.final.argmax(-1), out.final, out.router)


@torch.no_grad()
def predict_baseline(net: ViTBaseline, images: torch.Tensor) -> ViTPrediction:
    """The end-to-end ViT's prediction: one forward pass."""
    logits = net.eval()(images)
    return ViTPrediction(logits.argmax(-1), logits, None)


def evaluate_vit(
    nets: Sequence[nn.Module],
    plan: Sequence[BlockSpec],
    split: ImageSplit,
    levels: SigmaLevels,
    *,
    baseline: bool,
    seed: int = 0,
) -> dict:
    """Top-1 accuracy on the test and train images: B chained blocks, or the baseline ([net])."""
    device = next(nets[0].parameters()).device
    out = {}
    for name, x, y in (("test", split.test_x, split.test_y), ("train", split.train_x, split.train_y)):
        x, y = x.to(device), y.to(device)
        pred = predict_baseline(nets[0], x) if baseline else predict_vit(nets, plan, x, levels, seed=seed)
        out[f"{name}_accuracy"] = (pred.labels == y).double().mean().item()
    return out


# ---- the family -----------------------------------------------------------------------------------
class ViT(Family):
    name = "vit"
    data = "digits"
    kind = "images"
    config = ViTConfig
    sizes = VIT_SIZES
    rows = (Row("test accuracy", "test_accuracy", "{:.2%}"),)
    headline = Headline("test_accuracy", higher_is_better=True, threshold=CHAMPION_MIN_ACCURACY)

    build = staticmethod(build_vit)
    block_loss = staticmethod(vit_loss)
    make_denoiser = staticmethod(vit_denoiser)

    def predict_arrays(self, cfg: ViTConfig) -> tuple[dict[str, Array], Array]:
        label = Array(torch.float32, (None, cfg.width))  # a point in the label-embedding space
        images = Array(torch.float32, (None, cfg.channels, cfg.image_size, cfg.image_size))
        return {"z": label, "sigma": BATCH_SIGMA, "images": images}, label

    baseline_loss = staticmethod(vit_baseline_loss)

    def data_fields(self, card, run) -> dict:
        """The image shape and classes; a classifier needs labelled images."""
        if card.kind == "images" and card.num_classes < 2:
            raise ConfigError(
                f"{run.data.name}: the ViT classifies, and this dataset has {card.num_classes} classes; "
                "prepare labelled images (one subfolder per class)"
            )
        return super().data_fields(card, run)

    def evaluate(self, nets, plan, run, data, *, baseline: bool) -> dict:
        split = image_split(data)
        return evaluate_vit(list(nets), list(plan), split, run.levels, baseline=baseline, seed=run.seed)
