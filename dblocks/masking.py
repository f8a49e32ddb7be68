"""Masked diffusion's schedule math (MD4: Shi et al. 2024), the level space of the mdm family.

The noise level is the masking time t in [0, 1]: each token of a clean sequence is independently
replaced by the mask token with probability 1 - alpha(t); alpha(0) = 1 (clean), alpha(1) = 0 (all
masked). DiffusionBlocks partitions alpha by equal decrements (design.md 1.5); the continuous-time
ELBO weights the masked-token CE by w(t) = -alpha'(t) / (1 - alpha(t)) (MD4 Eq. 5).

    z       = mask(x, t)                                P(z_i = [M]) = 1 - alpha(t)
    loss(t) = w(t) * sum_{i masked} CE(logits_i, x_i) / T
    ELBO    = int_0^1 E[loss(t)] dt                     (nats per character)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")
T_MIN_WEIGHT = 1e-4  # t is clamped below at this value for the ELBO weight (w = 1/t for linear)


# ---- masking schedules (MD4 Sec. 2, Table 4) ---------------------------------------------------
def alpha_linear(t: torch.Tensor) -> torch.Tensor:
    """MD4's linear schedule alpha(t) = 1 - t: the probability a token is still unmasked at t."""
    return 1.0 - t


def dalpha_linear(t: torch.Tensor) -> torch.Tensor:
    """alpha'(t) = -1 for the linear schedule."""
    return torch.full_like(t, -1.0)


def masked_linear(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha(t) = t, the masking probability (exact at both ends)."""
    return t


def time_linear(m: torch.Tensor) -> torch.Tensor:
    """The t at which the masking probability 1 - alpha(t) equals m: t = m."""
    return m


def alpha_cosine(t: torch.Tensor) -> torch.Tensor:
    """MD4's cosine schedule alpha(t) = 1 - cos(pi/2 (1 - t)) = 1 - sin(pi t / 2)."""
    return 1.0 - masked_cosine(t)


def dalpha_cosine(t: torch.Tensor) -> torch.Tensor:
    """alpha'(t) = -(pi/2) sin(pi/2 (1 - t)) = -(pi/2) cos(pi t / 2)."""
    return -(math.pi / 2) * torch.cos(math.pi / 2 * t)


def masked_cosine(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha(t) = cos(pi/2 (1 - t)), written as sin(pi t / 2) so it is exactly 0 at t=0, 1 at t=1."""
    return torch.sin(math.pi / 2 * t)


def time_cosine(m: torch.Tensor) -> torch.Tensor:
    """The t with 1 - alpha(t) = m: t = (2/pi) arcsin(m) = 1 - (2/pi) arccos(m)."""
    return (2 / math.pi) * torch.asin(m)


@dataclass(frozen=True)
class Schedule:
    """A masking schedule: alpha, its derivative, 1 - alpha (computed directly) and its inverse."""

    alpha: Callable[[torch.Tensor], torch.Tensor]
    dalpha: Callable[[torch.Tensor], torch.Tensor]
    masked: Callable[[torch.Tensor], torch.Tensor]
    time_of: Callable[[torch.Tensor], torch.Tensor]


_SCHEDULES = {
    "linear": Schedule(alpha_linear, dalpha_linear, masked_linear, time_linear),
    "cosine": Schedule(alpha_cosine, dalpha_cosine, masked_cosine, time_cosine),
}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (``model.schedule``)."""
    if name not in _SCHEDULES:
        raise ValueError(f"model.schedule={name!r}: choose one of {', '.join(SCHEDULES)}")
    return _SCHEDULES[name]


def elbo_weight(t: torch.Tensor, name: str = "linear") -> torch.Tensor:
    """MD4's continuous-time ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (MD4 Eq. 5; 1/t for linear),
    with t clamped below at 1e-4 (float64)."""
    s = get_schedule(name)
    t = torch.as_tensor(t, dtype=torch.float64).clamp_min(T_MIN_WEIGHT)
    return -s.dalpha(t) / s.masked(t)


def partition_times(num_blocks: int, schedule: str = "linear") -> list[float]:
    """B+1 ascending t boundaries with equal alpha decrements, alpha(t_b) = 1 - b/B (design.md 1.5).

    t_b = alpha^-1(1 - b/B): linear t_b = b/B; cosine t_b = 1 - (2/pi) arccos(b/B).
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"blocks.num={num_blocks}: must be an integer >= 1")
    s = get_schedule(schedule)
    inner = [float(s.time_of(torch.tensor(b / num_blocks, dtype=torch.float64))) for b in range(1, num_blocks)]
    return [0.0, *inner, 1.0]


# ---- forward process and the ELBO integrand ------------------------------------------------------
def mask_tokens(
    x: torch.Tensor, t: torch.Tensor, uniforms: torch.Tensor, schedule_name: str, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MD4's forward process q(z_t | x): z_i = [M] where u_i < 1 - alpha(t), else x_i. Returns (z, masked).

    ``uniforms`` are (N, T) draws of U[0, 1) (float64), so t = 0 masks nothing and t = 1 everything.
    """
    p = get_schedule(schedule_name).masked(t.to(torch.float64))[:, None]  # (N, 1)
    masked = uniforms.to(p.device) < p  # (N, T)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def elbo_integrand(
    logits: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, schedule_name: str
) -> torch.Tensor:
    """w(t) * sum_{i masked} CE(logits_i, x_i) / T per sample, (N,) (MD4 Eq. 5 integrand, nats/char).

    Carry-over (SUBS): unmasked positions are the token itself and contribute nothing.
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").reshape(x.shape)
    per = torch.where(masked, ce, torch.zeros_like(ce)).sum(1) / x.shape[1]
    return elbo_weight(t, schedule_name).to(per.device, per.dtype) * per
