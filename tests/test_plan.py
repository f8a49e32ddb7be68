"""The run plan (design.md 1.2): equal contiguous layer groups, equal-mass ranges, overlap for training."""

from __future__ import annotations

import math

import pytest

from dblocks import SigmaLevels, make_plan, partition_sigmas, plan_boundaries, plan_hash
from helpers import SIGMA_MAX, SIGMA_MIN, interval_mass

LEVELS = SigmaLevels()


@pytest.mark.parametrize("num_blocks, num_layers", [(1, 6), (2, 6), (3, 6), (6, 6), (3, 12), (4, 12)])
def test_plan_layers_and_ranges(num_blocks, num_layers):
    plan = make_plan(LEVELS, num_blocks, num_layers, gamma=0.05)
    assert [s.index for s in plan] == list(range(num_blocks))
    assert all(s.num_blocks == num_blocks for s in plan)
    per = num_layers // num_blocks
    # Equal contiguous layer groups; block 0 holds the first layers.
    assert [(s.layer_start, s.layer_end) for s in plan] == [(b * per, (b + 1) * per) for b in range(num_blocks)]
    # Block 0 owns the highest sigmas; ranges tile [sigma_min, sigma_max] with equal mass.
    assert plan[0].hi == SIGMA_MAX and plan[-1].lo == SIGMA_MIN
    for hi_block, lo_block in zip(plan, plan[1:]):
        assert hi_block.lo == lo_block.hi
    for s in plan:
        assert interval_mass(s.lo, s.hi) == pytest.approx(1 / num_blocks, abs=1e-9)
    assert plan_boundaries(plan) == partition_sigmas(num_blocks)


def test_plan_training_ranges_are_the_widened_ranges():
    gamma = 0.1
    plan = make_plan(LEVELS, 3, 6, gamma=gamma)
    for s in plan:
        delta = math.log(s.hi / s.lo)
        assert s.train_lo == pytest.approx(max(SIGMA_MIN, s.lo * math.exp(-gamma * delta)), rel=1e-12)
        assert s.train_hi == pytest.approx(min(SIGMA_MAX, s.hi * math.exp(gamma * delta)), rel=1e-12)
    # Neighbouring training ranges overlap, routing ranges do not.
    for hi_block, lo_block in zip(plan, plan[1:]):
        assert hi_block.train_lo < lo_block.hi < lo_block.train_hi


def test_plan_gamma_zero_trains_on_the_routing_ranges():
    for s in make_plan(LEVELS, 3, 6, gamma=0.0):
        assert (s.train_lo, s.train_hi) == (s.lo, s.hi)


def test_plan_uniform_partition():
    plan = make_plan(LEVELS, 3, 6, partition="uniform_log")
    assert plan_boundaries(plan) == partition_sigmas(3, kind="uniform_log")


@pytest.mark.parametrize("num_blocks, num_layers", [(4, 6), (7, 6), (5, 12)])
def test_plan_rejects_unequal_layer_groups(num_blocks, num_layers):
    with pytest.raises(ValueError, match="blocks.num"):
        make_plan(LEVELS, num_blocks, num_layers)


def test_plan_hash_is_stable_and_sensitive():
    a = plan_hash(make_plan(LEVELS, 3, 6), model="debug")
    assert a == plan_hash(make_plan(LEVELS, 3, 6), model="debug")
    assert len(a) == 16 and int(a, 16) >= 0
    others = {
        plan_hash(make_plan(LEVELS, 3, 6, gamma=0.1), model="debug"),
        plan_hash(make_plan(LEVELS, 2, 6), model="debug"),
        plan_hash(make_plan(LEVELS, 3, 12), model="debug"),
        plan_hash(make_plan(LEVELS, 3, 6, partition="uniform_log"), model="debug"),
        plan_hash(make_plan(LEVELS, 3, 6), model="tiny"),
    }
    assert a not in others and len(others) == 5
