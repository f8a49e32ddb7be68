"""Noise levels as a type: the space a family's blocks partition, sample and route in.

Two spaces, one set of methods (``partition``, ``widen``, ``sample``, ``grid``, ``bucket_edges``):

- :class:`SigmaLevels` -- EDM's log-normal sigma space (paper Sec. 3.2, App. C): the ``noise``
  section of the run config. The numbers themselves (0.002, 80, -1.2, 1.2, 0.5) live only in
  ``noise.py`` / ``precond.py``; everything else takes them from here.
- :class:`TimeLevels` -- masked diffusion's time t in [0, 1] (MD4; design.md 1.5): blocks own
  intervals of equal alpha decrement, t is drawn uniformly inside a block.

A :class:`~dblocks.plan.BlockSpec` stores ``lo/hi`` of whichever space its family uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import ConfigError
from .noise import (
    P_MEAN,
    P_STD,
    SIGMA_MAX,
    SIGMA_MIN,
    inference_sigmas,
    karras_sigmas,
    partition_sigmas,
    sample_sigmas,
    widen_range,
)
from .precond import SIGMA_DATA


@dataclass(frozen=True)
class SigmaLevels:
    """ln sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max]; EDM's sigma_data."""

    sigma_min: float = SIGMA_MIN  # the smallest noise level (EDM; Sec. 3.2)
    sigma_max: float = SIGMA_MAX  # the largest noise level, where sampling starts
    p_mean: float = P_MEAN  # mean of ln sigma in training (EDM's log-normal, App. C)
    p_std: float = P_STD  # std of ln sigma in training; the blocks split its mass equally
    sigma_data: float = SIGMA_DATA  # the data's std in EDM's preconditioning (c_skip, c_out, c_in)

    space: ClassVar[str] = "sigma"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(
                f"noise.sigma_min={self.sigma_min} must be > 0 and below noise.sigma_max={self.sigma_max}"
            )
        if self.p_std <= 0:
            raise ConfigError(f"noise.p_std={self.p_std}: must be > 0")
        if self.sigma_data <= 0:
            raise ConfigError(f"noise.sigma_data={self.sigma_data}: must be > 0")

    @property
    def density(self) -> dict:
        """The training density's parameters, as keyword arguments of the ``noise.py`` functions."""
        return dict(p_mean=self.p_mean, p_std=self.p_std)

    @property
    def bounds(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def partition(self, num_blocks: int, kind: str = "equiprob") -> list[float]:
        """B+1 ascending boundaries of equal probability mass (Sec. 3.2; ``uniform_log``: ablation)."""
        return partition_sigmas(num_blocks, **self.bounds, **self.density, kind=kind)

    def widen(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """The training range with overlap gamma, in log space, clipped to [sigma_min, sigma_max] (Sec. 3.3)."""
        return widen_range(lo, hi, gamma, **self.bounds)

    def sample(self, n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
        """n sigmas from the log-normal truncated to [lo, hi] (App. C), float32."""
        return sample_sigmas(n, lo, hi, **self.density, generator=generator)

    def grid(self, steps: int) -> torch.Tensor:
        """``steps`` inference sigmas from sigma_max to sigma_min, equally spaced in the truncated CDF (Sec. 3.4)."""
        return inference_sigmas(steps, **self.bounds, **self.density)

    def karras(self, steps: int) -> torch.Tensor:
        """EDM's rho = 7 grid (the end-to-end baseline's sampler)."""
        return karras_sigmas(steps, **self.bounds)

    def bucket_edges(self, lo: float, hi: float, buckets: int) -> torch.Tensor:
        """``buckets + 1`` log-spaced edges over [lo, hi], for loss-per-level curves (float64)."""
        return torch.logspace(math.log10(lo), math.log10(hi), buckets + 1, dtype=torch.float64)


@dataclass(frozen=True)
class TimeLevels:
    """Masking time t in [0, 1] under the schedule alpha(t) (``linear`` | ``cosine``)."""

    schedule: str = "linear"

    space: ClassVar[str] = "t"

    def partition(self, num_blocks: int, kind: str = "equiprob") -> list[float]:
        """B+1 ascending t boundaries with equal alpha decrements (design.md 1.5); ``kind`` is the
        sigma partition's option and does not apply to t."""
        from .masking import partition_times

        return partition_times(num_blocks, self.schedule)

    def widen(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """Overlap gamma widens [lo, hi] by gamma * (hi - lo) each side, clipped to [0, 1]."""
        d = gamma * (hi - lo)
        return max(lo - d, 0.0), min(hi + d, 1.0)

    def sample(self, n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
        """t ~ U(lo, hi), float64."""
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    def grid(self, steps: int) -> torch.Tensor:
        """The ancestral sampler's uniform grid t_j = 1 - j/steps, j = 0..steps (float64)."""
        if steps < 1:
            raise ValueError(f"sample.steps={steps}: must be >= 1")
        return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps

    def bucket_edges(self, lo: float, hi: float, buckets: int) -> torch.Tensor:
        """``buckets + 1`` linear edges over [lo, hi] (float64)."""
        return torch.linspace(lo, hi, buckets + 1, dtype=torch.float64)


Levels = SigmaLevels | TimeLevels
