"""The recurrent-depth family (design.md 1.5): a single-pass core denoiser vs truncated BPTT.

Oracles: hook-counted core/prelude calls (one pass in training, K at inference, bptt with gradient
in the baseline), gradients against an explicit detach-at-K-bptt unroll, the Euler loop and the CDF
grid written out by hand, w(sigma) CE by hand, causality by perturbation, the fixed table.
"""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from dblocks.config import TrainConfig
from dblocks.embedding import fixed_embedding
from dblocks.families.recurrent import (
    evaluate_recurrent,
    first_call_logits,
    predict_recurrent,
    recurrent_baseline_loss,
    recurrent_loss,
)
from dblocks.levels import SigmaLevels
from dblocks.models.recurrent import (
    RECURRENT_SIZES,
    RecurrentBaseline,
    RecurrentBlock,
    build_recurrent,
    recurrent_config,
)
from dblocks.plan import make_plan
from dblocks.seeds import seeded
from dblocks.text import VOCAB_SIZE, TextSplit, encode, windows
from dblocks.trainer import BlockTrainer
from helpers import P_MEAN, P_STD, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

LEVELS = SigmaLevels(SIGMA_MIN, SIGMA_MAX, P_MEAN, P_STD, SIGMA_DATA)
CFG = recurrent_config("debug")
SIGMAS = torch.tensor([0.002, 0.02, 0.3, 1.0, 80.0])


def _build(cfg=CFG, *, baseline=False, seed=0, init=0):
    with seeded(init):
        return build_recurrent(cfg, make_plan(LEVELS, 1, cfg.layers)[0], baseline=baseline, seed=seed)


def _randomized(net, seed=0, std=0.15):
    """Random values for every parameter (adaLN-Zero would make the output ignore its inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return net


def _tokens(n=5, cfg=CFG, seed=0):
    return torch.randint(0, VOCAB_SIZE, (n, cfg.seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _record(module):
    """Appends torch.is_grad_enabled() at every forward call of ``module``."""
    calls: list[bool] = []
    module.register_forward_hook(lambda m, a, out: calls.append(torch.is_grad_enabled()))
    return calls


def _w(sigma):
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


# ---- config ---------------------------------------------------------------------------------------
def test_sizes_overrides_and_validation():
    d, t = RECURRENT_SIZES["debug"], RECURRENT_SIZES["tiny"]
    assert (d.width, d.heads, d.seq_len, d.iterations, d.freq_dim) == (32, 2, 32, 4, 32)
    assert (t.width, t.heads, t.seq_len, t.iterations, t.bptt) == (64, 4, 64, 8, 2)
    assert t.vocab_size == 84 and (t.prelude, t.core, t.coda) == (1, 2, 1) and t.layers == 4
    c = recurrent_config("tiny", prelude=2, core=3, coda=0, iterations=16, bptt=4, layers=None)
    assert c.layers == 5 and (c.iterations, c.bptt) == (16, 4)
    for bad, key in [
        ({"bptt": 9}, "model.bptt"),
        ({"heads": 3}, "model.heads"),
        ({"core": 0}, "model.core"),
        ({"iterations": 1, "bptt": 1}, "model.iterations"),
        ({"layers": 4}, "model.layers"),
        ({"patch": 2}, "model.patch"),
    ]:
        with pytest.raises(ValueError, match=key):
            recurrent_config("tiny", **bad)


def test_build_is_one_block_of_all_layers():
    plan3 = make_plan(LEVELS, 3, 3)
    with pytest.raises(ValueError, match="blocks.num=3"):
        build_recurrent(replace(CFG, prelude=1, core=1, coda=1), plan3[0], seed=0)
    with pytest.raises(ValueError, match="layers"):
        build_recurrent(CFG, make_plan(LEVELS, 1, 6)[0], seed=0)
    assert isinstance(_build(), RecurrentBlock) and isinstance(_build(baseline=True), RecurrentBaseline)


# ---- fixed table and parameter ownership ---------------------------------------------------------
def test_target_table_is_the_fixed_run_seed_table_and_never_trained():
    a, b, c = _build(seed=7, init=1), _build(seed=7, init=2), _build(seed=8, init=1)
    expected = fixed_embedding(VOCAB_SIZE, CFG.width, 7)
    assert torch.equal(a.targets, expected) and torch.equal(b.targets, expected)  # independent of init RNG
    assert not torch.equal(c.targets, expected)  # a pure function of the RUN seed
    torch.testing.assert_close(a.targets.norm(dim=1), torch.ones(VOCAB_SIZE))
    assert "targets" in a.state_dict() and "targets" not in dict(a.named_parameters())
    base = _build(baseline=True, seed=7)
    assert torch.equal(base.targets, expected) and "targets" in base.state_dict()
    # One optimizer step leaves the table untouched.
    opt = torch.optim.SGD(a.parameters(), lr=1.0)
    recurrent_loss(a, (_tokens(),), SIGMAS, torch.Generator().manual_seed(0)).mean().backward()
    opt.step()
    assert torch.equal(a.targets, expected)


@pytest.mark.parametrize("baseline", [False, True])
def test_every_parameter_is_owned_used_and_unshared(baseline):
    net, other = _randomized(_build(baseline=baseline)), _build(baseline=baseline)
    loss_fn = recurrent_baseline_loss if baseline else recurrent_loss
    loss_fn(net, (_tokens(),), SIGMAS, torch.Generator().manual_seed(0)).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ptrs = [p.data_ptr() for p in net.parameters()]
    assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & {p.data_ptr() for p in other.parameters()}


def test_block_and_baseline_have_the_same_parameters():
    block, base = _build().named_parameters(), _build(baseline=True).named_parameters()
    assert {n: p.shape for n, p in block} == {n: p.shape for n, p in base}


# ---- the DiffusionBlocks loss: one pass, w(sigma) CE -----------------------------------------------
def test_recurrent_loss_runs_the_core_once():
    net = _build()
    calls = {name: _record(getattr(net, name)) for name in ("prelude", "core", "coda")}
    loss = recurrent_loss(net, (_tokens(),), SIGMAS, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert {k: len(v) for k, v in calls.items()} == {"prelude": 1, "core": 1, "coda": 1}


def test_recurrent_loss_at_init_is_w_times_ln_vocab():
    """The zero-initialised head gives logits = 0: CE = ln 84 at every position and sigma."""
    loss = recurrent_loss(_build(), (_tokens(),), SIGMAS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.double(), _w(SIGMAS) * math.log(VOCAB_SIZE), rtol=1e-5, atol=0)


def test_recurrent_loss_equals_weighted_ce_by_hand():
    net = _randomized(_build(seed=3))
    tokens = _tokens()
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = recurrent_loss(net, (tokens,), SIGMAS, torch.Generator().manual_seed(4))
    eps = torch.randn(*y.shape, CFG.width, generator=torch.Generator().manual_seed(4))
    s = SIGMAS.reshape(-1, 1, 1)
    z = fixed_embedding(VOCAB_SIZE, CFG.width, 3)[y] + s * eps
    c_skip, c_out = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    c = net.condition(SIGMAS.log() / 4)
    h = net.core(net.prelude(x) + c_in * z, c)
    logp = net.coda(c_out * h + c_skip * z, c).log_softmax(-1)
    ce = -logp.gather(-1, y[..., None]).squeeze(-1).double().mean(1)
    torch.testing.assert_close(loss.double(), _w(SIGMAS) * ce, rtol=1e-5, atol=0)
    assert torch.equal(loss, recurrent_loss(net, (tokens,), SIGMAS, torch.Generator().manual_seed(4)))
    assert not torch.equal(loss, recurrent_loss(net, (tokens,), SIGMAS, torch.Generator().manual_seed(5)))


# ---- the baseline: truncated BPTT -------------------------------------------------------------------
def _reference_unroll_loss(net, tokens, generator, cut):
    """An explicit unroll s_k = LN(core(s_{k-1} + e)) with s detached after ``cut`` steps."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    s = net.cfg.init_std * torch.randn(*x.shape, net.cfg.width, generator=generator)
    e = net.prelude(x)
    c = net.condition(torch.zeros(x.shape[0]))
    for k in range(net.cfg.iterations):
        if k == cut:
            s = s.detach()
        s = F.layer_norm(net.core(s + e, c), (net.cfg.width,), eps=1e-6)
    return F.cross_entropy(net.coda(s, c).flatten(0, 1), y.flatten())


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def test_baseline_backpropagates_through_the_last_bptt_iterations_only():
    cfg = replace(CFG, iterations=5, bptt=2)
    net = _randomized(_build(cfg, baseline=True))
    tokens = _tokens(cfg=cfg)
    core_calls = _record(net.core)
    loss = recurrent_baseline_loss(net, (tokens,), SIGMAS, torch.Generator().manual_seed(1))
    assert core_calls == [False] * 3 + [True] * 2  # K - bptt without a graph, then bptt with one
    got = _grads(net, loss.mean())
    truncated = _grads(net, _reference_unroll_loss(net, tokens, torch.Generator().manual_seed(1), cut=3))
    full = _grads(net, _reference_unroll_loss(net, tokens, torch.Generator().manual_seed(1), cut=0))
    for name in got:
        torch.testing.assert_close(got[name], truncated[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(got[n], full[n], rtol=1e-3, atol=1e-5) for n in got)  # truncation matters


def test_baseline_loss_at_init_is_ln_vocab():
    loss = recurrent_baseline_loss(_build(baseline=True), (_tokens(),), SIGMAS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.double(), torch.full((5,), math.log(VOCAB_SIZE), dtype=torch.float64))


# ---- inference: K Euler steps = K core calls, one prelude -------------------------------------------
@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("iterations", [None, 6])
def test_inference_runs_the_prelude_once_and_the_core_k_times(baseline, iterations):
    net = _build(baseline=baseline)
    calls = {name: _record(getattr(net, name)) for name in ("prelude", "core", "coda")}
    logits = predict_recurrent(net, _tokens()[:, :-1], LEVELS, iterations=iterations, seed=0)
    k = iterations or CFG.iterations
    assert logits.shape == (5, CFG.seq_len, VOCAB_SIZE)
    assert {n: len(v) for n, v in calls.items()} == {"prelude": 1, "core": k, "coda": 1 if baseline else k}


def test_inference_is_euler_on_the_cdf_grid_by_hand():
    net = _randomized(_build(seed=2))
    x, k = _tokens()[:, :-1], 5
    # The grid: K points equally spaced in the truncated CDF, sigma_max down to sigma_min (design.md 1.4).
    phi = NormalDist()
    q0, q1 = (phi.cdf((math.log(s) - P_MEAN) / P_STD) for s in (SIGMA_MIN, SIGMA_MAX))
    grid = [math.exp(P_MEAN + P_STD * phi.inv_cdf(q0 + (k - 1 - j) / (k - 1) * (q1 - q0))) for j in range(k)]
    grid[0], grid[-1] = SIGMA_MAX, SIGMA_MIN
    table = fixed_embedding(VOCAB_SIZE, CFG.width, 2)
    with torch.no_grad():
        e = net.prelude(x)
        z = SIGMA_MAX * torch.randn(*x.shape, CFG.width, generator=torch.Generator().manual_seed(9))
        for j, s in enumerate(grid):
            logits = net(z, torch.full((5,), s, dtype=torch.float64), e)
            if j == 0:
                first = logits
            if j + 1 < k:
                z = z + (grid[j + 1] - s) * (z - logits.softmax(-1) @ table) / s
    got = predict_recurrent(net, x, LEVELS, iterations=k, seed=9)
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_call_logits(net, x, LEVELS, seed=9), first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, predict_recurrent(net, x, LEVELS, iterations=k, seed=10))


# ---- causality ------------------------------------------------------------------------------------
def test_position_i_sees_clean_tokens_and_noisy_targets_at_positions_up_to_i_only():
    """Training forward: logits_i depends on x_0..x_i and z_0..z_i, nothing later."""
    net = _randomized(_build())
    tokens = _tokens(2)
    x = tokens[:, :-1]
    z = torch.randn(2, CFG.seq_len, CFG.width, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 2.0])
    base = net(z, sigma, net.prelude(x))
    i = 10
    x2, z2 = x.clone(), z.clone()
    x2[:, i + 1 :] = (x2[:, i + 1 :] + 1) % VOCAB_SIZE
    z2[:, i + 1 :] += torch.randn(CFG.width, generator=torch.Generator().manual_seed(2))
    out = net(z2, sigma, net.prelude(x2))
    torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])
    # A random direction, not a constant: a shift along (1, ..., 1) is removed by every LayerNorm.
    bump = torch.randn(CFG.width, generator=torch.Generator().manual_seed(1))
    for pos in (i, i - 3):  # a clean token <= i, or z_j (j <= i), does reach position i
        x3, z3 = x.clone(), z.clone()
        x3[:, pos] = (x3[:, pos] + 1) % VOCAB_SIZE
        z3[:, pos] += bump
        assert not torch.allclose(net(z, sigma, net.prelude(x3))[:, i], base[:, i])
        assert not torch.allclose(net(z3, sigma, net.prelude(x))[:, i], base[:, i])


@pytest.mark.parametrize("baseline", [False, True])
def test_inference_is_causal(baseline):
    net = _randomized(_build(baseline=baseline))
    x = _tokens(3)[:, :-1]
    base = predict_recurrent(net, x, LEVELS, seed=1)
    i = 7
    x2 = x.clone()
    x2[:, i + 1 :] = (x2[:, i + 1 :] + 5) % VOCAB_SIZE
    torch.testing.assert_close(
        predict_recurrent(net, x2, LEVELS, seed=1)[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-5
    )
    x2[:, i] = (x2[:, i] + 5) % VOCAB_SIZE
    assert not torch.allclose(predict_recurrent(net, x2, LEVELS, seed=1)[:, i], base[:, i])


# ---- training and evaluation ------------------------------------------------------------------------
TEXT = "ROMEO:\nthe cat sat on the mat; the dog ran to the log.\nJULIET:\nso the sun sets on the sea.\n" * 40


def _split(cfg):
    rows = windows(encode(TEXT), cfg.seq_len)
    return TextSplit(train=rows, val=rows[:32], test=rows[:32])


def test_short_training_lowers_both_losses_and_evaluates():
    cfg = replace(CFG, iterations=4, bptt=2)
    split = _split(cfg)
    spec = make_plan(LEVELS, 1, cfg.layers)[0]
    train = TrainConfig(lr=3e-3, warmup_samples=1, batch_size=16)
    probe = torch.tensor([0.05, 0.3, 1.0, 3.0] * 4)
    results = {}
    for baseline in (False, True):
        net = _build(cfg, baseline=baseline)
        loss_fn = recurrent_baseline_loss if baseline else recurrent_loss

        def held_out():  # unweighted CE at fixed sigmas and noise (for the block: loss / w)
            with torch.no_grad():
                loss = loss_fn(net, (split.val[:16],), probe, torch.Generator().manual_seed(0))
            return (loss if baseline else loss / _w(probe).float()).mean().item()

        before = held_out()
        trainer = BlockTrainer(net, spec, loss_fn, train, LEVELS, seed=0)
        g = torch.Generator().manual_seed(1)
        for _ in range(40):
            trainer.step((split.train[torch.randint(0, len(split.train), (16,), generator=g)],))
        after = held_out()
        assert before == pytest.approx(math.log(VOCAB_SIZE), rel=1e-4)
        assert after < 0.5 * before, (baseline, before, after)
        plan = make_plan(LEVELS, 1, cfg.layers, gamma=0.0)
        results[baseline] = evaluate_recurrent(
            [net], plan, split, LEVELS, baseline=baseline, windows=16, sample_chars=12
        )
        with pytest.raises(ValueError, match="baseline"):
            evaluate_recurrent([net], plan, split, LEVELS, baseline=not baseline, windows=4, sample_chars=1)
    assert "val_loss_first_call" in results[False] and "val_loss_first_call" not in results[True]
    for m in results.values():
        assert math.isfinite(m["val_loss"]) and m["val_bpc"] == pytest.approx(m["val_loss"] / math.log(2))
        assert 1 / VOCAB_SIZE < m["val_accuracy"] <= 1.0
        assert m["sample_text"].startswith(split.prompt) and len(m["sample_text"]) == len(split.prompt) + 12
