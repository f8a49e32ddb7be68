"""What MLflow shows: metric names that read without the code."""

from __future__ import annotations

import torch

from dblocks.levels import SigmaLevels
from worker.block_worker import bucket_losses


def test_sigma_bucket_metrics_are_named_by_their_ranges_and_average_their_samples():
    edges = SigmaLevels().bucket_edges(0.1, 10.0, 2)  # log-spaced: 0.1, 1, 10
    level = torch.tensor([0.2, 0.5, 2.0, 9.0, 0.3])
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0])
    assert bucket_losses(level, losses, edges) == {"loss_sigma/0.1-1": 3.0, "loss_sigma/1-10": 15.0}
    assert bucket_losses(level[:2], losses[:2], edges, "t") == {"loss_t/0.1-1": 2.0}  # empty buckets left out
