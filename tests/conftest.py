"""Shared fixtures for the unit tests (no services, CPU only, debug model size)."""

from __future__ import annotations

import pytest
import torch

import dblocks

# The debug-size tensors are far too small to gain from intra-op threads, and OpenMP threads that
# spin-wait on an oversubscribed machine slow every matmul down by ~100x: run single-threaded.
torch.set_num_threads(1)


@pytest.fixture
def debug_cfg() -> dblocks.DiTConfig:
    return dblocks.dit_config("debug")


@pytest.fixture
def image_batch():
    """A fixed tiny batch shaped like the digits data: (8, 1, 8, 8) in [-1, 1], labels 0..9."""
    g = torch.Generator().manual_seed(1234)
    images = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(8) % 10
    return images, labels
