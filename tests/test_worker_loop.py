"""The worker loop: an interrupted block resumes from its checkpoint bit-exactly, data order included."""

from __future__ import annotations

import pytest
import torch

from dblocks.config import RunConfig
from dblocks.data import load_digits_split
from dblocks.plan import make_plan
from worker.loop import train_block


def config(steps: int) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"size": "debug"},
            "blocks": {"num": 2},
            "train": {"steps": steps, "batch_size": 16, "checkpoint_every": 2, "log_every": 100, "device": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


@pytest.mark.parametrize("block", [0, 1])
def test_interrupted_training_resumes_bit_exactly(tmp_path, data, block):
    spec = make_plan(2, 6)[block]
    straight = train_block(config(6), spec, data, tmp_path / "straight", "plan")
    train_block(config(3), spec, data, tmp_path / "resumed", "plan")  # stops at step 3 ("crash")
    resumed = train_block(config(6), spec, data, tmp_path / "resumed", "plan")  # fresh objects, resume
    assert resumed.step_count == straight.step_count == 6
    a, meta_a = straight.state_dict()
    b, meta_b = resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert meta_a == meta_b


def test_checkpoint_of_another_plan_is_refused_and_kept(tmp_path, data):
    spec = make_plan(2, 6)[0]
    train_block(config(2), spec, data, tmp_path, "plan-a")
    path = tmp_path / "block0.safetensors"
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="another plan"):
        train_block(config(4), spec, data, tmp_path, "plan-b")
    assert path.read_bytes() == before
