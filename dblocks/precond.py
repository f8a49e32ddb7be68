"""EDM preconditioning (Karras et al. 2022, Table 1), as used for every block (Sec. 3.1).

D(z, sigma) = c_skip(sigma) z + c_out(sigma) F(c_in(sigma) z, c_noise(sigma)).
c_in applies to the noisy target only, never to a conditioning input.
"""

from __future__ import annotations

from typing import Callable

import torch

SIGMA_DATA = 0.5


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Eq. 8; paper Eq. 6).

    Satisfies lambda * c_out^2 = 1, so every sigma contributes a unit-scale loss in F-space.
    """
    sigma = torch.as_tensor(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _expand(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim)).to(like.dtype)


def denoise(
    net: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigma: torch.Tensor,
    *cond,
    sigma_data: float = SIGMA_DATA,
    **kwcond,
) -> torch.Tensor:
    """Preconditioned denoiser D(z, sigma) around a raw network F(c_in z, c_noise, *cond).

    ``sigma`` has shape (N,) for a batch z of shape (N, ...).
    """
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    f = net(_expand(c_in, z) * z, c_noise.to(z.dtype), *cond, **kwcond)
    return _expand(c_skip, z) * z + _expand(c_out, z) * f


def edm_readout(h: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """c_out(sigma) h + c_skip(sigma) z: EDM's output recombination (Table 1; paper Sec. 3.4,
    design.md 1.5) applied to the network's output h *before* a discrete target's classifier.

    ``sigma`` is (N,); the scalings broadcast over every trailing axis of z, e.g. (N, D) or (N, T, D).
    """
    c_skip, c_out, _, _ = edm_scalings(sigma, sigma_data)
    return _expand(c_out, z) * h + _expand(c_skip, z) * z
