"""Seeds derived from the run seed, so every worker builds the same thing without talking."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts, e.g. (run seed, block, "init")."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_seed(seed: int, index: int, purpose: str = "train") -> int:
    """A distinct seed per (run seed, block, purpose)."""
    return derive_seed(seed, index, purpose)


@contextmanager
def seeded(seed: int):
    """Run a block of code (e.g. weight init) under a fixed global torch seed, then restore the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
