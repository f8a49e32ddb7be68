"""The main job end to end (debug size): trains, samples, reports, resumes; bad config fails in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "experiment=debug",
    "train.steps=20",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "sample.steps=5",
    "sample.per_class=2",
    "train.threads=1",
]


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("debug-run")
    proc = run_job(*TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_job_trains_every_block_and_the_baseline_and_reports(job):
    out, proc = job
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"DiffusionBlocks B=2", "end-to-end"}
    for row in metrics["results"].values():
        assert {"heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy"} <= set(row)
        assert len(row["heldout_loss_per_range"]) == 2
    assert metrics["classifier_test_accuracy"] >= 0.97
    for name in ("block0", "block1"):
        assert (out / "blocks" / "checkpoints" / f"{name}.safetensors").is_file()
    grid = Image.open(out / "blocks" / "samples.png")  # rows = digits, sample.per_class=2 columns, 4x
    assert grid.size == ((2 * 9 + 1) * 4, (10 * 9 + 1) * 4)
    assert "classifier acc. on samples" in proc.stdout


def test_rerun_resumes_from_checkpoints_without_retraining(job):
    out, _ = job
    before = {p: p.stat().st_mtime_ns for p in (out / "blocks" / "checkpoints").glob("*.safetensors")}
    proc = run_job(*TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resumed at step 20") == 3  # two blocks + the baseline
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after  # nothing retrained or rewritten


def test_changed_plan_refuses_old_checkpoints_and_keeps_them(job):
    out, _ = job
    ckpt = out / "blocks" / "checkpoints" / "block0.safetensors"
    data = ckpt.read_bytes()
    proc = run_job(*TINY, f"output_dir={out}", "blocks.gamma=0.2")
    assert proc.returncode != 0
    assert "another plan" in proc.stderr
    assert ckpt.read_bytes() == data


@pytest.mark.parametrize(
    "override, field",
    [
        ("blocks.num=0", "blocks.num"),
        ("blocks.num=12", "blocks.num"),
        ("blocks.num=4", "blocks.num"),  # does not divide 6 layers
        ("noise.sigma_min=100", "noise.sigma_min"),
        ("blocks.gamma=-0.1", "blocks.gamma"),
        ("model.size=huge", "model.size"),
        ("blocks.partition=linear", "blocks.partition"),
    ],
)
def test_bad_config_fails_at_start_with_one_line_naming_the_field(override, field, tmp_path):
    proc = run_job("experiment=debug", override, f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], proc.stderr
    assert not (tmp_path / "out" / "blocks").exists()


def test_one_block_is_the_end_to_end_model(tmp_path):
    proc = run_job(*TINY, "blocks.num=1", "baseline=false", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["results"]) == ["end-to-end"]
    assert (tmp_path / "baseline" / "checkpoints" / "block0.safetensors").is_file()
    assert not (tmp_path / "blocks").exists()
