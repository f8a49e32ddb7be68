"""The run plan: which sigma range and which layers each block owns (Sec. 3.2-3.3).

The partition lives here once; trainer, sampler and (later) coordinator and workers import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .noise import block_range, partition_sigmas, widen_range


@dataclass(frozen=True)
class BlockSpec:
    index: int  # 0 = first layers = highest noise
    num_blocks: int
    sigma_lo: float  # inference range (routing), un-widened
    sigma_hi: float
    train_lo: float  # training range, widened by the overlap gamma
    train_hi: float
    layer_start: int  # the block's layers are [layer_start, layer_end) of the L-layer network
    layer_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def make_plan(
    num_blocks: int,
    num_layers: int,
    *,
    gamma: float = 0.05,
    partition: str = "equiprob",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> list[BlockSpec]:
    """One BlockSpec per block: equal contiguous layer groups, equal-mass sigma ranges."""
    bounds = partition_sigmas(
        num_blocks, sigma_min=sigma_min, sigma_max=sigma_max, p_mean=p_mean, p_std=p_std, kind=partition
    )
    widen = lambda lo, hi: widen_range(lo, hi, gamma, sigma_min=sigma_min, sigma_max=sigma_max)  # noqa: E731
    return plan_from_boundaries(bounds, num_layers, widen)


def make_time_plan(boundaries: list[float], num_layers: int, *, gamma: float = 0.0) -> list[BlockSpec]:
    """A plan over masking time t in [0, 1] (MDM, design.md 1.5): ``boundaries`` ascending in t,
    block 0 owning the highest t. Overlap widens each range by gamma*width linearly, clipped to [0, 1].
    The ranges are stored in the same BlockSpec fields as sigma ranges (sigma_lo = t_lo, ...)."""

    def widen(lo: float, hi: float) -> tuple[float, float]:
        d = gamma * (hi - lo)
        return max(lo - d, 0.0), min(hi + d, 1.0)

    return plan_from_boundaries(boundaries, num_layers, widen)


def plan_from_boundaries(bounds: list[float], num_layers: int, widen) -> list[BlockSpec]:
    """B = len(bounds) - 1 blocks over ascending ``bounds``; ``widen(lo, hi)`` gives the training range."""
    num_blocks = len(bounds) - 1
    if num_blocks > num_layers or num_layers % num_blocks:
        raise ValueError(f"blocks.num={num_blocks}: must divide model.layers={num_layers}")
    per = num_layers // num_blocks
    specs = []
    for b in range(num_blocks):
        lo, hi = block_range(bounds, b)
        tlo, thi = widen(lo, hi)
        specs.append(BlockSpec(b, num_blocks, lo, hi, tlo, thi, b * per, (b + 1) * per))
    return specs


def plan_boundaries(plan: list[BlockSpec]) -> list[float]:
    """The B+1 ascending un-widened boundaries of a plan (for the router)."""
    return [plan[-1].sigma_lo] + [s.sigma_hi for s in reversed(plan)]


def plan_hash(plan: list[BlockSpec], **context) -> str:
    """A short stable hash of the plan and whatever else the blocks must agree on."""
    blob = json.dumps({"blocks": [asdict(s) for s in plan], **context}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
