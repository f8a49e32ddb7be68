"""Samplers over any denoiser callable ``D(z, sigma, **extra) -> denoised`` (k-diffusion style),
and the router that makes B blocks look like one denoiser (Sec. 3.4).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from .noise import route

Denoiser = Callable[..., torch.Tensor]


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """EDM Euler step z <- z + (sigma_next - sigma) (z - D) / sigma (sigma_next < sigma).

    (The paper prints this update with the opposite sign; this is the correct form.)
    """
    return z + (sigma_next - sigma) * (z - denoised) / sigma


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    z: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler sampler (Sec. 3.4): one denoiser call per grid point, then a final denoise at sigmas[-1].

    ``z`` starts as sigma_max * N(0, I); ``sigmas`` is descending. Returns the final D(z, sigma_min).
    """
    extra_args = extra_args or {}
    n = z.shape[0]
    grid = [float(s) for s in sigmas]  # float64: routing must see the exact grid sigma
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = denoiser(z, torch.full((n,), s, dtype=torch.float64, device=z.device), **extra_args)
        if callback is not None:
            callback(i, s, denoised)
        z = euler_step(z, denoised, s, s_next)
    return denoiser(z, torch.full((n,), grid[-1], dtype=torch.float64, device=z.device), **extra_args)


class BlockRouter:
    """B block denoisers as one denoiser: each sample's sigma goes to the block owning it.

    ``blocks[b]`` is block b's denoiser (block 0 owns the highest sigma); ``boundaries`` are the
    B+1 ascending un-widened boundaries. ``calls`` counts the calls made to each block.
    """

    def __init__(self, blocks: Sequence[Denoiser], boundaries: Sequence[float]):
        if len(blocks) != len(boundaries) - 1:
            raise ValueError(f"{len(blocks)} blocks but {len(boundaries) - 1} sigma ranges")
        self.blocks = list(blocks)
        self.boundaries = list(boundaries)
        self.calls: Counter[int] = Counter()

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        owner = route(sigma, self.boundaries)
        out = torch.empty_like(z)
        for b in owner.unique().tolist():
            idx = (owner == b).nonzero().squeeze(1)
            sub = {k: (v[idx] if torch.is_tensor(v) and v.shape[:1] == z.shape[:1] else v) for k, v in extra.items()}
            out[idx] = self.blocks[b](z[idx], sigma[idx], **sub)
            self.calls[b] += 1
        return out


def classifier_free_guidance(denoiser: Denoiser, scale: float, null_label: int) -> Denoiser:
    """D_g = D(z | none) + scale (D(z | label) - D(z | none)), in one batched call (Ho & Salimans 2022).

    scale = 1 is the plain conditional denoiser.
    """

    def guided(z: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return denoiser(z, sigma, labels=labels)
        both = denoiser(
            torch.cat([z, z]),
            torch.cat([sigma, sigma]),
            labels=torch.cat([labels, torch.full_like(labels, null_label)]),
        )
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided
