"""The fixed target space of discrete families (labels, tokens): design.md Sec. 2.1, paper Sec. 4.

Every block must agree on where a label or token lives, but no block may own that table (a
learned, shared table would couple the blocks). So the table is generated from the run seed,
L2-normalised row by row, and never trained: every worker rebuilds the identical table without
talking to the others. A block outputs logits over the table; its denoised estimate is the
expected embedding ``softmax(logits) @ E`` (Sec. 3.4, discrete targets).
"""

from __future__ import annotations

import torch

from .seeds import derive_seed


def fixed_embedding(num: int, dim: int, seed: int, purpose: str = "targets") -> torch.Tensor:
    """(num, dim) float32 table of unit-norm rows, a pure function of (num, dim, seed, purpose)."""
    g = torch.Generator().manual_seed(derive_seed(seed, purpose, num, dim))
    table = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return (table / table.norm(dim=1, keepdim=True)).float()


def expected_embedding(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ E: the denoised estimate of a discrete target (..., K) -> (..., dim)."""
    return logits.softmax(-1).to(table.dtype) @ table
