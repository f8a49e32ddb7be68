"""What MLflow shows: metric names that read without the code."""

from __future__ import annotations

import pytest
import torch

from dblocks.levels import SigmaLevels
from helpers import mlflow_client
from worker.block_worker import bucket_losses


def test_sigma_bucket_metrics_are_named_by_their_ranges_and_average_their_samples():
    edges = SigmaLevels().bucket_edges(0.1, 10.0, 2)  # log-spaced: 0.1, 1, 10
    level = torch.tensor([0.2, 0.5, 2.0, 9.0, 0.3])
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0])
    assert bucket_losses(level, losses, edges) == {"loss_sigma/0.1-1": 3.0, "loss_sigma/1-10": 15.0}
    assert bucket_losses(level[:2], losses[:2], edges, "t") == {"loss_t/0.1-1": 2.0}  # empty buckets left out


def test_a_run_plots_the_held_out_loss_against_sigma_and_logs_it_to_the_parent_run(tmp_path, monkeypatch):
    import json
    import sys

    from PIL import Image

    from coordinator.__main__ import main
    from helpers import TINY_DEBUG_JOB

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["dblocks-run", *TINY_DEBUG_JOB, "redis.url=memory://dash", f"output_dir={out}"])
    main()
    metrics = json.loads((out / "metrics.json").read_text())
    (result,) = metrics["results"].values()
    curve = result["heldout_loss_curve"]
    assert len(curve["edges"]) == 17 and len(curve["loss"]) == 16  # 16 log-spaced bins over [0.002, 80]
    assert curve["edges"][0] == pytest.approx(0.002) and curve["edges"][-1] == pytest.approx(80.0)
    assert all(x > 0 for x in curve["loss"])
    with Image.open(out / "loss_vs_sigma.png") as im:
        assert im.width >= 600 and im.height >= 300
    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "debug"]
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dblocks.run_id` != ''")
    assert "loss_vs_sigma.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    logged = {m.name for m in client.search_logged_models(experiment_ids=[exp.experiment_id])}
    assert logged == {"debug-block0", "debug-block1"}  # the logged models say which block they are
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs, not GenAI
    for b in range(2):  # the registry says what each block is and how to load it
        model = client.get_registered_model(f"debug-block{b}")
        assert model.description.startswith(f"DiffusionBlocks block {b} of 2: layers [")
        assert "σ range [" in model.description and "models:/debug-block" in model.description
        (version,) = client.search_model_versions(f"name = 'debug-block{b}'")
        assert version.description == model.description


def test_previews_log_the_chained_blocks_metrics_and_samples_while_training(tmp_path, monkeypatch):
    """``eval.every=1``: each block exports its EMA weights after every unit; the coordinator chains
    the latest exports and logs the family's metrics and a sample grid to the parent run. Inline
    workers take turns of a unit, so the chain is complete, and previewed, after units 1 and 2."""
    import sys

    from PIL import Image

    from coordinator.__main__ import main
    from helpers import TINY_DEBUG_JOB

    out = tmp_path / "out"
    job = [*TINY_DEBUG_JOB, "train.steps=20", "eval.every=1", "redis.url=memory://preview", f"output_dir={out}"]
    monkeypatch.setattr(sys, "argv", ["dblocks-run", *job])
    main()
    grid = out / "samples" / "during" / "blocks" / "unit-2.png"
    with Image.open(grid) as im:  # a row per digit, sample.per_class=2 columns, 4x
        assert im.size == ((2 * 9 + 1) * 4, (10 * 9 + 1) * 4)
    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "debug"]
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dblocks.run_id` != ''")
    history = client.get_metric_history(parent.info.run_id, "preview/blocks/heldout_loss")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "samples/during/blocks")}
    assert logged == {"samples/during/blocks/unit-1.png", "samples/during/blocks/unit-2.png"}
