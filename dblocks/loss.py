"""The per-block weighted denoising loss (paper Eq. 6).

L_b = E_{(x,y), sigma ~ p_b, eps} lambda(sigma) * Loss(block_b(x, y + sigma eps, sigma), y).
Each function returns the unreduced per-sample loss, shape (N,); the caller reduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precond import SIGMA_DATA, loss_weight


def weighted_l2(
    denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """lambda(sigma) * mean_elements((D - y)^2) for continuous targets (images).

    The mean over elements (EDM's convention) keeps the scale independent of the image size.
    """
    per = (denoised - target).square().flatten(1).mean(1)
    return loss_weight(sigma, sigma_data).to(per.dtype) * per


def weighted_ce(
    logits: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """lambda(sigma) * cross-entropy(logits, labels) for discrete targets (labels, tokens).

    logits (N, K) or (N, T, K); labels (N,) or (N, T); token losses are averaged per sample.
    """
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    per = ce.reshape(labels.shape).flatten(1).mean(1) if labels.ndim > 1 else ce
    return loss_weight(sigma, sigma_data).to(per.dtype) * per
