"""A registered block of every family: logged with a signature and an input example, without a
warning, and its ``predict`` through MLflow is the family's denoiser D(z, sigma, **cond), bit for bit
(both sides in this process: the same backend and thread count)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import asdict

import mlflow
import numpy as np
import pytest
import torch

from coordinator.tracking import MlflowTracker
from dblocks.checkpoint import save_checkpoint
from dblocks.families import FAMILIES
from dblocks.families.base import plan_for
from helpers import family_run


def exported_block(name: str, baseline: bool, path) -> tuple[torch.nn.Module, object, dict]:
    """Block 0 of family ``name`` at debug size, its weights perturbed (a fresh block's adaLN-zero
    output is 0 whatever the input), exported as the worker does."""
    run = family_run(name)
    spec = plan_for(run, 1 if baseline else run.blocks.num)[0]
    family = FAMILIES[name]
    net = family.build(run.model.resolved(), spec, baseline=baseline, seed=0).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    plain = run.to_dict()
    meta = {"spec": asdict(spec), "model": plain["model"], "noise": plain["noise"], "seed": 0, "baseline": baseline}
    save_checkpoint(path, net.state_dict(), meta)
    return net, run, meta


def inputs_of(arrays: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The example's shapes (2 rows, free axes 2 long): floats drawn at random, ids as the example's."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, a in arrays.items():
        x = a.example()
        if x.is_floating_point():
            u = torch.rand(x.shape, generator=g)
            # sigma (t for the MDM step) in [0.5, 1), its s below it, u uniform, the rest Gaussian
            x = {"sigma": 0.5 + 0.5 * u, "s": 0.4 * u, "u": u}.get(k, torch.randn(x.shape, generator=g))
        out[k] = x.numpy()
    return out


@contextlib.contextmanager
def mlflow_warnings():
    """MLflow's own warning records (its logger has its own handler and does not propagate)."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep, logger = Keep(logging.WARNING), logging.getLogger("mlflow")
    logger.addHandler(keep)
    try:
        yield seen
    finally:
        logger.removeHandler(keep)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowTracker(f"sqlite:///{root / 'mlflow.db'}", "pyfunc", str(root / "artifacts"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_registered_block_has_a_signature_and_predicts_its_denoiser(name, tracker, tmp_path):
    family = FAMILIES[name]
    net, run, _ = exported_block(name, False, tmp_path / "block.safetensors")
    parent = tracker.start_run(f"t-{name}", {})
    with warnings.catch_warnings(record=True) as caught, mlflow_warnings() as logged:
        warnings.simplefilter("always")
        tracker.register_block(parent, tmp_path / "block.safetensors", f"t-{name}-block0", {}, "champion", "d")
    assert not [str(w.message) for w in caught if "mlflow" in w.filename], [str(w.message) for w in caught]
    assert not logged, [r.getMessage() for r in logged]

    model = mlflow.pyfunc.load_model(f"models:/t-{name}-block0@champion")
    arrays, output = family.predict_arrays(run.model.resolved())
    signature = model.metadata.signature
    assert [s.name for s in signature.inputs.inputs] == list(arrays)
    for s, a in zip(signature.inputs.inputs, arrays.values()):
        assert s.shape == tuple(-1 if n is None else n for n in a.shape)
        assert s.type == torch.empty(0, dtype=a.dtype).numpy().dtype
    assert model.metadata.get_input_schema() is not None and model.metadata.saved_input_example_info is not None

    x = inputs_of(arrays)
    got = model.predict(x)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    z, sigma = t.pop("z"), t.pop("sigma")
    from dblocks.build import export_levels

    meta = model.unwrap_python_model().meta
    with torch.no_grad():
        want = family.denoiser(net, export_levels(meta))(z, sigma, **t)
    assert got.dtype == torch.empty(0, dtype=output.dtype).numpy().dtype
    assert torch.equal(torch.from_numpy(got), want)
    assert not torch.equal(want, torch.zeros_like(want))


def test_a_baseline_that_is_not_a_denoiser_is_logged_without_a_signature_or_a_warning(tracker, tmp_path):
    exported_block("ar", True, tmp_path / "block.safetensors")
    parent = tracker.start_run("t-ar-baseline", {})
    with mlflow_warnings() as logged:
        tracker.register_block(parent, tmp_path / "block.safetensors", "t-ar-baseline", {}, "champion")
    assert not logged, [r.getMessage() for r in logged]
    model = mlflow.pyfunc.load_model("models:/t-ar-baseline@champion")
    assert model.metadata.signature is None
    with pytest.raises(TypeError, match=re.escape("not a denoiser; use .unwrap_python_model().net")):
        model.predict({"z": np.zeros((1, 1, 1), np.float32)})
