"""Logits out of the sampler, for every family whose target is discrete (ViT, AR, recurrent).

A discrete block's network gives logits over the fixed target table E; the sampler needs the
denoised estimate D(z) = softmax(logits) @ E (Sec. 3.4, design.md 1.4), and the evaluation needs
the logits themselves. :class:`DiscreteDenoiser` is that one adapter: the sampler sees a plain
denoiser, and the adapter keeps the logits of its latest call. :func:`chain_logits` runs the
Euler chain over the blocks and returns the logits of the first and of the final call (the final
call's argmax is the prediction; the first call, at sigma_max, is the calibrated one-call
distribution).

    denoisers = [DiscreteDenoiser(partial(net, images=x), net.label_table) for net in nets]
    first, final, router = chain_logits(denoisers, plan_boundaries(plan), z, levels.grid(B))
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from ..embedding import expected_embedding
from ..noise import route
from ..sampling import BlockRouter, sample_euler


class DiscreteDenoiser:
    """D(z, level, **cond) = softmax(logits) @ E around ``logits_fn(z, level, **cond) -> (..., K)``.

    ``last_logits`` holds the logits of the latest call, ``calls`` counts the calls. ``table`` is
    the fixed target table E (K, D) the logits range over.
    """

    def __init__(self, logits_fn: Callable[..., torch.Tensor], table: torch.Tensor):
        self.logits_fn, self.table = logits_fn, table
        self.last_logits: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, z: torch.Tensor, level: torch.Tensor, **cond) -> torch.Tensor:
        self.last_logits = self.logits_fn(z, level, **cond)
        self.calls += 1
        return expected_embedding(self.last_logits, self.table).to(z.dtype)


class ChainLogits(NamedTuple):
    first: torch.Tensor  # logits of the sampler's first call (at grid[0])
    final: torch.Tensor  # logits of the final call (at grid[-1]): the prediction
    router: BlockRouter  # router.calls counts the calls per block


@torch.no_grad()
def chain_logits(
    denoisers: Sequence[DiscreteDenoiser],
    boundaries: Sequence[float],
    z: torch.Tensor,
    grid: torch.Tensor,
    **cond,
) -> ChainLogits:
    """Euler over ``grid`` (descending sigma) from ``z`` through the blocks routed by ``boundaries``
    (B+1 ascending; one block: its whole range), ``cond`` passed to every call (Sec. 3.4)."""
    router = BlockRouter(denoisers, boundaries)
    owner = lambda level: denoisers[int(route(float(level), router.boundaries))]  # noqa: E731
    first: list[torch.Tensor] = []

    def denoise(z: torch.Tensor, level: torch.Tensor, **extra) -> torch.Tensor:
        out = router(z, level, **extra)
        if not first:  # every row of a sampler call sits at the same grid point: one block answered
            first.append(owner(level[0]).last_logits)
        return out

    sample_euler(denoise, z, grid, extra_args=cond)
    return ChainLogits(first[0], owner(grid[-1]).last_logits, router)
