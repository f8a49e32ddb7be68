"""Work units: the unit of dispatch, acknowledgement and resume (design.md 2.3, step 2).

A block's training is cut into units of ``train.unit_steps`` optimizer steps. A unit names the
rows it trains on (a shard and a row range) and one seed; the coordinator derives that seed for
the unit, and it fixes the unit's noise levels (sigma drawn from the block's truncated density),
its noise draws and its batch order. Applying a unit is a pure function of the trainer state and
the unit, so a unit re-applied after a crash (from the checkpoint taken before it) gives exactly
the result of the first attempt: resume is bit-exact and a unit can never count twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .seeds import derive_seed
from .trainer import BlockTrainer


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the run's storage root
    rows: int


@dataclass(frozen=True)
class WorkUnit:
    seq: int  # 0, 1, ... within one block: the order units are applied in
    shard: str
    row_start: int
    row_end: int
    epoch: int  # passes over the shard list so far (informational)
    steps: int
    seed: int  # sigma levels, noise and batch order of this unit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkUnit":
        return cls(**d)


def make_units(total_steps: int, unit_steps: int, shards: list[Shard], seed: int, block: int) -> list[WorkUnit]:
    """ceil(total/unit_steps) units for one block, cycling over the shards (every block reads all
    of them), each with a seed drawn from (run seed, block, seq)."""
    units, done, seq = [], 0, 0
    while done < total_steps:
        shard = shards[seq % len(shards)]
        steps = min(unit_steps, total_steps - done)
        s = derive_seed(seed, block, "unit", seq)
        units.append(WorkUnit(seq, shard.path, 0, shard.rows, seq // len(shards), steps, s))
        done, seq = done + steps, seq + 1
    return units


def unit_batches(unit: WorkUnit, batch_size: int) -> list[torch.Tensor]:
    """Row indices (into the unit's row range) of each of the unit's ``steps`` batches: fresh
    seeded permutations of the range, consumed in order, the tail of a permutation dropped."""
    n = unit.row_end - unit.row_start
    if batch_size > n:
        raise ValueError(
            f"train.batch_size={batch_size}: larger than the {n} rows of shard {unit.shard}; "
            "use a smaller batch, or prepare the data with fewer, larger shards (dblocks-data shards=K)"
        )
    per_perm = n // batch_size
    g = torch.Generator().manual_seed(derive_seed(unit.seed, "rows"))
    batches: list[torch.Tensor] = []
    while len(batches) < unit.steps:
        perm = torch.randperm(n, generator=g)
        batches += [perm[k * batch_size : (k + 1) * batch_size] for k in range(per_perm)]
    return batches[: unit.steps]


def apply_unit(trainer: BlockTrainer, unit: WorkUnit, rows: tuple[torch.Tensor, ...]) -> list[dict]:
    """Run the unit's steps on ``trainer``; ``rows`` are the unit's rows, one tensor per column
    ((images, labels) or (tokens,)). Returns each step's metrics."""
    trainer.generator.manual_seed(unit.seed)  # the unit, not the history, fixes its sigma and noise
    device = next(trainer.net.parameters()).device
    return [
        trainer.step(tuple(c[idx].to(device) for c in rows)) for idx in unit_batches(unit, trainer.train.batch_size)
    ]
