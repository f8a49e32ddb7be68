"""Evaluation: held-out weighted denoising loss, Frechet distance, and a classifier that judges samples.

- ``heldout_loss``: the training objective (Eq. 6) on test data, sigma drawn from a fixed
  generator, over the whole density or one block's range.
- ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between two sets of
  vectors (Heusel et al. 2017), with ``eps * I`` added to both covariances: 8x8 digits have
  constant corner pixels, so the raw pixel covariance is singular.
- ``ImageClassifier``: a small CNN trained deterministically on the train split; its
  penultimate features give the feature-space FD, its predictions the accuracy of
  class-conditional samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .levels import SigmaLevels
from .loss import weighted_l2
from .seeds import seeded


def frechet_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-4) -> float:
    """Frechet distance between Gaussians fitted to rows of a (N, D) and b (M, D)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    mu1, mu2 = a.mean(0), b.mean(0)
    eye = eps * torch.eye(a.shape[1], dtype=torch.float64)
    s1, s2 = torch.cov(a.T) + eye, torch.cov(b.T) + eye
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD form.
    w1, v1 = torch.linalg.eigh(s1)
    r1 = v1 @ torch.diag(w1.clamp_min(0).sqrt()) @ v1.T
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


@torch.no_grad()
def heldout_loss(
    denoiser: Callable[..., torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma_lo: float,
    sigma_hi: float,
    levels: SigmaLevels,
    *,
    seed: int = 1234,
    repeats: int = 4,
) -> float:
    """Mean Eq. 6 loss of ``denoiser(z, sigma, labels=...)`` on held-out data, sigma ~ p on [lo, hi]
    (``levels``: the training density and sigma_data).

    The same seed gives the same (sigma, eps) draws to every model compared.
    """
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        sigma = levels.sample(len(images), sigma_lo, sigma_hi, g)
        sigma, eps = sigma.to(images.device), torch.randn(images.shape, generator=g).to(images.device)
        z = images + sigma.reshape(-1, 1, 1, 1) * eps
        total += weighted_l2(denoiser(z, sigma, labels=labels), images, sigma, levels.sigma_data).mean().item()
    return total / repeats


class ImageClassifier(nn.Module):
    """Small CNN for images in [-1, 1] (8x8 digits by default): two 3x3 convs, a pool, a 128-d feature layer."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: tuple[int, int] = (8, 8)):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * (size[0] // 2) * (size[1] // 2), 128)
        self.out = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int = 10,
    channels: int = 1,
    size: tuple[int, int] = (8, 8),
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 64,
) -> ImageClassifier:
    """Deterministic training (fixed seed for init, batches and augmentation noise).

    Light Gaussian pixel noise (std 0.1) makes it robust to the small imperfections of samples.
    """
    batch_size = max(1, min(batch_size, len(labels)))
    with seeded(seed):
        model = ImageClassifier(num_classes, channels, size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(labels) // batch_size))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for i in range(len(labels) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = images[idx] + 0.1 * torch.randn(images[idx].shape, generator=g)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()
