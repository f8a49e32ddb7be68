"""``train.ce_weighting`` (issue 15): per_sample is Eq. 6 as written and unchanged; batch_mean is the
official code's broadcast, mean(w) * mean(CE); the worker's effective batch is (sum w)^2 / sum w^2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_families import N
from test_families import _run as family_run

from dblocks import ConfigError, load_digits_split, load_text_split
from dblocks.build import make_trainer, model_plans
from dblocks.families.base import effective_batch
from dblocks.families.discrete import discrete_loss
from dblocks.loss import weighted_ce
from dblocks.units import WorkUnit
from helpers import SIGMA_DATA
from worker.block_worker import BlockWorker

DISCRETE = ("vit", "ar", "recurrent")


def _run(name: str, **train):
    """A debug run of the family, batch N (test_families' run), 4 steps in units of 2."""
    return family_run(name, steps=4, unit_steps=2, **train)


def _rows(run) -> tuple:
    if run.family.data == "digits":
        split = load_digits_split()
        return split.train_x[:64], split.train_y[:64]
    return (load_text_split(run.model.resolved().seq_len).train[:64],)


def _w(sigmas: list[float]) -> list[float]:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Eq. 8), in Python floats."""
    return [(s * s + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2 for s in sigmas]


# ---- the hand-made batch ----------------------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-3.0, 1.0, 4.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 1, 1])
SIGMAS = [0.002, 0.1, 0.5, 80.0]


def _ce() -> list[float]:
    """CE_i = logsumexp(logits_i) - logits_i[y_i], written out."""
    return [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(LOGITS.tolist(), LABELS.tolist())]


def test_batch_mean_is_the_mean_weight_times_the_mean_ce_on_a_hand_made_batch():
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    per = discrete_loss(LOGITS, LABELS, sigma, SIGMA_DATA, ce_weighting="batch_mean")
    w, ce = _w(SIGMAS), _ce()
    mean_w = sum(w) / len(w)
    assert per.mean().item() == pytest.approx(mean_w * sum(ce) / len(ce), rel=1e-12)
    assert per.tolist() == pytest.approx([mean_w * c for c in ce], rel=1e-12)  # every sample gets mean(w)
    per_sample = discrete_loss(LOGITS, LABELS, sigma, SIGMA_DATA, ce_weighting="per_sample")
    assert per_sample.tolist() == pytest.approx([a * c for a, c in zip(w, ce)], rel=1e-12)


@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 7)], ids=["labels", "tokens"])
def test_per_sample_is_bit_identical_to_the_weighted_ce_of_eq6(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    sigma = torch.exp(torch.randn(shape[0], generator=g))
    assert torch.equal(discrete_loss(logits, labels, sigma, SIGMA_DATA), weighted_ce(logits, labels, sigma, SIGMA_DATA))
    plain = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").reshape(labels.shape)
    plain = plain.mean(1) if labels.ndim > 1 else plain
    assert torch.equal(discrete_loss(logits, labels, sigma, SIGMA_DATA, weighted=False), plain)


@pytest.mark.parametrize("name", DISCRETE)
def test_a_familys_batch_mean_loss_is_mean_w_times_its_plain_ce(name):
    """Through the family's loss, same net and draws: batch_mean = mean(w) * the unweighted CE; per_sample
    (the default) = w_i * the unweighted CE."""
    run = _run(name)
    spec = model_plans(run)["blocks"][0]
    net = make_trainer(run, spec).net
    sigma = run.levels.sample(N, spec.train_lo, spec.train_hi, torch.Generator().manual_seed(3))
    batch = tuple(c[:N] for c in _rows(run))
    fam, cfg = run.family, run.model.resolved()

    def loss(**kw):
        return fam.loss(cfg, run.levels, baseline=False, **kw)(net, batch, sigma, torch.Generator().manual_seed(7))

    plain = loss(weighted=False).double()
    w = torch.tensor(_w(sigma.tolist()), dtype=torch.float64)
    torch.testing.assert_close(
        loss(weighted=True, ce_weighting="batch_mean").double(), w.mean() * plain, rtol=1e-5, atol=0
    )
    torch.testing.assert_close(loss(weighted=True).double(), w * plain, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["dit", "mdm"])
def test_families_without_a_weighted_ce_refuse_batch_mean(name):
    with pytest.raises(ConfigError, match="train.ce_weighting=batch_mean"):
        _run(name, ce_weighting="batch_mean")


# ---- the effective batch ------------------------------------------------------------------------------
def test_effective_batch_closed_forms():
    assert effective_batch(torch.full((64,), 3.7)) == pytest.approx(64, rel=1e-12)  # all equal: N
    assert effective_batch(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(1, rel=1e-12)  # one: 1
    assert effective_batch(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(16 / 6, rel=1e-12)  # (1+1+2)^2/(1+1+4)


@pytest.mark.parametrize(
    ("weighting", "model"), [("per_sample", "blocks"), ("batch_mean", "blocks"), ("per_sample", "e2e")]
)
def test_the_worker_logs_the_mean_effective_batch_of_its_units_steps(weighting, model):
    """The metric of one unit = the mean over its steps of (sum w)^2 / sum w^2 of each step's levels;
    batch_mean and the unweighted baseline give every sample the same weight: exactly N."""
    run = _run("ar", ce_weighting=weighting)
    spec = model_plans(run)[model][0]
    trainer = make_trainer(run, spec, baseline=model == "e2e")
    rows = _rows(run)
    unit = WorkUnit(0, "shard", 0, len(rows[0]), 0, steps=3, seed=11)
    levels = []
    step = trainer.step

    def recording_step(batch):  # the trainer's own step; keeps each step's levels for the oracle
        out = step(batch)
        levels.append(out["sigma"].tolist())
        return out

    trainer.step = recording_step
    worker = BlockWorker(None, "run", f"{model}/0", "consumer")
    edges = run.levels.bucket_edges(spec.train_lo, spec.train_hi, 4)
    metrics = worker._apply(trainer, unit, rows, edges)
    assert len(levels) == 3
    if weighting == "batch_mean" or model == "e2e":
        expected = N
    else:
        expected = sum(sum(w) ** 2 / sum(x * x for x in w) for w in map(_w, levels)) / len(levels)
    assert metrics["effective_batch"] == pytest.approx(expected, rel=1e-5)
