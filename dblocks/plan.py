"""The run plan: which sigma range and which layers each block owns (Sec. 3.2-3.3).

The partition lives here once; trainer, sampler and (later) coordinator and workers import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .levels import Levels
from .noise import block_range


@dataclass(frozen=True)
class BlockSpec:
    index: int  # 0 = first layers = highest noise
    num_blocks: int
    lo: float  # inference range (routing), un-widened, in the family's level space (sigma, or MDM's t)
    hi: float
    train_lo: float  # training range, widened by the overlap gamma
    train_hi: float
    layer_start: int  # the block's layers are [layer_start, layer_end) of the L-layer network
    layer_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def make_plan(
    levels: Levels, num_blocks: int, num_layers: int, *, gamma: float = 0.05, partition: str = "equiprob"
) -> list[BlockSpec]:
    """One BlockSpec per block: equal contiguous layer groups, equal-mass ranges of ``levels``
    (sigma: Sec. 3.2; MDM's t: equal alpha decrements), training ranges widened by gamma (Sec. 3.3)."""
    bounds = levels.partition(num_blocks, partition)
    return plan_from_boundaries(bounds, num_layers, lambda lo, hi: levels.widen(lo, hi, gamma))


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
    return [plan[-1].lo] + [s.hi for s in reversed(plan)]


def plan_hash(plan: list[BlockSpec], **context) -> str:
    """A short stable hash of the plan and whatever else the blocks must agree on."""
    blob = json.dumps({"blocks": [asdict(s) for s in plan], **context}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
