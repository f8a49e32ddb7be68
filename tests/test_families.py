"""The family registry (issue 16): every family is one object with the same interface, and the
w(sigma) ablation is a ``weighted`` flag of its loss -- never a division of the baseline's loss."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from dblocks import ConfigError, load_digits_split, load_text_split
from dblocks.build import make_trainer, model_plans
from dblocks.families import FAMILIES, Family, Headline, Row
from dblocks.families.discrete import DiscreteDenoiser, chain_logits
from dblocks.text import next_token_pairs
from helpers import SIGMA_DATA, family_run
from worker.config import load_run_config

N = 8


_run = family_run  # (name, **train) -> RunConfig at debug size, batch N


def _batch(run) -> tuple:
    """A small fixed batch of the family's data: (images, labels) or (token windows,)."""
    if run.family.data == "digits":
        split = load_digits_split()
        return split.train_x[:N], split.train_y[:N]
    return (load_text_split(run.model.resolved().seq_len).train[:N],)


def _weight(sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Eq. 8), written out."""
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


def _losses(run, spec, *, baseline: bool, weighted: bool, level: torch.Tensor, net=None):
    fam, cfg = run.family, run.model.resolved()
    if net is None:
        net = make_trainer(run, spec, baseline=baseline).net
    loss = fam.loss(cfg, run.levels, baseline=baseline, weighted=weighted)
    return loss(net, _batch(run), level, torch.Generator().manual_seed(7)), net


def _levels(run, spec) -> torch.Tensor:
    return run.levels.sample(N, spec.train_lo, spec.train_hi, torch.Generator().manual_seed(3))


# ---- (d) the protocol ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_registry_entry_has_the_protocols_attributes(name):
    fam = FAMILIES[name]
    assert isinstance(fam, Family) and fam.name == name
    assert fam.data in ("digits", "text")
    assert dataclasses.is_dataclass(fam.config) and fam.sizes
    assert all(isinstance(c, fam.config) for c in fam.sizes.values()) and "debug" in fam.sizes
    assert isinstance(fam.one_block, bool) and isinstance(fam.baseline_is_denoiser, bool)
    assert fam.rows and all(isinstance(r, Row) for r in fam.rows)
    assert isinstance(fam.headline, Headline) and isinstance(fam.headline.threshold, float)
    for method in ("levels", "check", "build", "loss", "denoiser", "evaluate", "summary", "passes", "table_rows"):
        assert callable(getattr(fam, method)), method
    assert "weighted" in inspect.signature(fam.loss).parameters
    run = _run(name)
    assert run.levels.space in ("sigma", "t") and isinstance(fam.summary(run), str)
    assert [r.key for r in fam.table_rows(run)][: len(fam.rows)] == [r.key for r in fam.rows]


def test_headline_passes_in_its_direction():
    up, down = Headline("acc", True, 0.8), Headline("bpc", False, 3.5)
    assert up.passes(0.8) and not up.passes(0.79) and up.passes(0.5, threshold=0.5)
    assert down.passes(3.5) and not down.passes(3.6) and down.passes(4.0, threshold=4.0)


# ---- (a) the weighted flag ---------------------------------------------------------------------------
def _weighting_families() -> list[str]:
    return [name for name, fam in FAMILIES.items() if _run(name).levels.space == "sigma"]


def _both_weightings(name: str, model: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample loss of ``model``'s first job with weighted=True and =False: same net, same draws."""
    run = _run(name)
    spec = model_plans(run)[model][0]
    level = _levels(run, spec)
    a, net = _losses(run, spec, baseline=model == "e2e", weighted=True, level=level)
    b, _ = _losses(run, spec, baseline=model == "e2e", weighted=False, level=level, net=net)
    return a, b, level


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_baseline_loss_does_not_depend_on_weighted(name):
    a, b, _ = _both_weightings(name, "e2e")
    assert a.shape == (N,) and torch.equal(a, b)


@pytest.mark.parametrize("name", _weighting_families())
def test_the_unweighted_block_loss_is_the_weighted_one_without_lambda(name):
    """Eq. 6 with and without w(sigma): the same draws, the same network, a ratio of lambda(sigma)."""
    a, b, level = _both_weightings(name, "blocks")
    assert b.shape == (N,) and not torch.equal(a, b)
    torch.testing.assert_close(b.double(), a.double() / _weight(level), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in _weighting_families()])
def test_a_family_whose_weight_is_not_w_sigma_refuses_the_ablation(name):
    with pytest.raises(ConfigError, match="train.loss_weighting"):
        _run(name, loss_weighting=False)


# ---- (b) the AR mixed head ---------------------------------------------------------------------------
def test_ar_mixed_heads_next_token_term_is_never_weighted():
    """Last block with the mixed head: loss = [w(sigma)] CE(logits, y) + CE(next_logits, y), the
    second term plain in both cases (a division by lambda afterwards would shrink it)."""
    model = {"family": "ar", "size": "debug", "mixed": True}
    run = load_run_config({"model": model, "data": {"source": "text"}, "blocks": {"num": 2}})
    spec = model_plans(run)["blocks"][-1]
    level = _levels(run, spec)
    a, net = _losses(run, spec, baseline=False, weighted=True, level=level)
    b, _ = _losses(run, spec, baseline=False, weighted=False, level=level, net=net)
    # The same computation by hand: z = E[y] + sigma eps with eps the generator's first draw.
    x, y = next_token_pairs(*_batch(run))
    table = net.target_table
    eps = torch.randn((*y.shape, table.shape[1]), generator=torch.Generator().manual_seed(7))
    z = table[y] + level[:, None, None] * eps
    logits, next_logits = net(x, z, level, SIGMA_DATA)
    assert next_logits is not None
    ce = lambda lg: F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none").reshape(y.shape).mean(1)  # noqa: E731
    block, head = ce(logits).double(), ce(next_logits).double()
    torch.testing.assert_close(a.double(), _weight(level) * block + head, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), block + head, rtol=1e-5, atol=1e-6)


# ---- (c) a trainer step of the baseline ----------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in FAMILIES if n in _weighting_families()])
def test_loss_weighting_false_leaves_the_baselines_training_unchanged(name):
    runs = [_run(name, loss_weighting=w) for w in (True, False)]
    spec = model_plans(runs[0])["e2e"][0]
    trainers = [make_trainer(r, spec, baseline=True) for r in runs]
    batch = _batch(runs[0])
    for _ in range(2):
        out = [t.step(batch) for t in trainers]
        assert out[0]["loss"] == out[1]["loss"] and torch.equal(out[0]["losses"], out[1]["losses"])
    for p, q in zip(trainers[0].net.parameters(), trainers[1].net.parameters()):
        assert torch.equal(p, q)


# ---- the discrete families' one way to logits ------------------------------------------------------------
def test_chain_logits_keeps_the_first_and_final_calls_logits():
    """Two blocks of a fixed 'network' whose logits encode (block, sigma): the first call is block 0
    at grid[0], the final call the owner of grid[-1]; the denoiser returns softmax(logits) @ E."""
    table = torch.eye(3)

    def block(b):
        return lambda z, sigma: torch.stack([sigma.float(), torch.full_like(z[:, 0], b), z[:, 0]], 1)

    denoisers = [DiscreteDenoiser(block(b), table) for b in (0, 1)]
    grid = torch.tensor([80.0, 5.0, 0.002], dtype=torch.float64)
    z = torch.zeros(4, 3)
    first, final, router = chain_logits(denoisers, [0.002, 1.0, 80.0], z, grid)
    assert torch.equal(first[:, :2], torch.tensor([[80.0, 0.0]] * 4))
    assert torch.equal(final[:, :2], torch.tensor([[0.002, 1.0]] * 4))
    assert dict(router.calls) == {0: 2, 1: 1} and [d.calls for d in denoisers] == [2, 1]
    out = denoisers[1](z, torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(out, denoisers[1].last_logits.softmax(-1) @ table)
