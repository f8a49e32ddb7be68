"""The masked-diffusion LM family (MD4, design.md 1.5): schedules, equal-alpha partition, the forward
process, the ELBO loss, carry-over, ancestral sampling through routed blocks, evaluation, training."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from dblocks.config import TrainConfig
from dblocks.families.mdm import (
    elbo_bpc,
    evaluate_mdm,
    mdm_baseline_loss,
    mdm_denoiser,
    mdm_loss,
    routed_logits,
    sample_mdm,
)
from dblocks.levels import TimeLevels
from dblocks.masking import (
    alpha_cosine,
    alpha_linear,
    dalpha_cosine,
    dalpha_linear,
    elbo_weight,
    mask_tokens,
    partition_times,
)
from dblocks.models.mdm import MDM_SIZES, MDMBlock, build_mdm, mdm_config
from dblocks.noise import route
from dblocks.plan import make_plan, plan_boundaries
from dblocks.seeds import seeded
from dblocks.text import VOCAB, TextSplit, corpus_files, encode, windows
from dblocks.trainer import BlockTrainer
from helpers import binomial_tol

V = 84  # the Shakespeare vocabulary; the mask token is id 84
LN_V = math.log(V)


def md4_alpha(t: torch.Tensor, kind: str) -> torch.Tensor:
    """MD4's schedules as printed (Shi et al. 2024): linear 1 - t, cosine 1 - cos(pi/2 (1 - t))."""
    return 1 - t if kind == "linear" else 1 - torch.cos(math.pi / 2 * (1 - t))


@pytest.fixture
def cfg():
    return mdm_config("debug")


@pytest.fixture(scope="module")
def text_windows() -> torch.Tensor:
    """Real text: (N, 33) windows of the first play (debug seq_len 32)."""
    return windows(encode(corpus_files()[0].read_text(encoding="utf-8")), 32)


def _plan(num_blocks: int, schedule: str = "linear", layers: int = 6):
    return make_plan(TimeLevels(schedule), num_blocks, layers, gamma=0.0)


def _capture_z(net: nn.Module) -> dict:
    seen = {}
    net.register_forward_pre_hook(lambda m, args: seen.update(z=args[0].detach().clone()))
    return seen


class Oracle(nn.Module):
    """A fixed predictor (not the code under test): logits `scale` at the true token of `x`."""

    def __init__(self, cfg, x: torch.Tensor, scale: float = 30.0):
        super().__init__()
        self.cfg, self.mask_id = cfg, cfg.mask_id
        self.logits = scale * nn.functional.one_hot(x, cfg.vocab_size).float()

    def forward(self, z, t):
        return self.logits


# ---- schedules and the partition ------------------------------------------------------------------
def test_linear_partition_values():
    assert partition_times(3) == [0.0, 1 / 3, 2 / 3, 1.0]
    assert partition_times(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert partition_times(1) == [0.0, 1.0]
    with pytest.raises(ValueError, match="blocks.num"):
        partition_times(0)
    with pytest.raises(ValueError, match="model.schedule"):
        partition_times(3, "sqrt")


@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6])
def test_cosine_partition_has_equal_alpha_decrements(num_blocks):
    t = partition_times(num_blocks, "cosine")
    assert t[0] == 0.0 and t[-1] == 1.0 and all(a < b for a, b in zip(t, t[1:]))
    alpha = md4_alpha(torch.tensor(t, dtype=torch.float64), "cosine")
    expected = 1 - torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks
    torch.testing.assert_close(alpha, expected, rtol=0, atol=1e-15)
    closed = [1 - (2 / math.pi) * math.acos(b / num_blocks) for b in range(num_blocks + 1)]
    assert t == pytest.approx(closed, abs=1e-15)
    # Reference value: B=2 splits at alpha = 1/2, t = 1 - (2/pi)(pi/3) = 1/3.
    if num_blocks == 2:
        assert t[1] == pytest.approx(1 / 3, abs=1e-15)


def test_block_zero_owns_the_noisiest_interval_and_boundaries_go_up():
    plan = _plan(3)
    assert (plan[0].lo, plan[0].hi) == (2 / 3, 1.0)
    assert (plan[2].lo, plan[2].hi) == (0.0, 1 / 3)
    assert [s.num_layers for s in plan] == [2, 2, 2]
    bounds = plan_boundaries(plan)
    t = torch.tensor([1.0, 0.9, 2 / 3, math.nextafter(2 / 3, 0), 0.5, 1 / 3, 0.2, 0.0], dtype=torch.float64)
    assert route(t, bounds).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "kind,alpha,dalpha", [("linear", alpha_linear, dalpha_linear), ("cosine", alpha_cosine, dalpha_cosine)]
)
def test_schedules_match_md4_and_their_derivatives_by_autograd(kind, alpha, dalpha):
    t = torch.linspace(0, 1, 101, dtype=torch.float64).requires_grad_(True)
    ref = md4_alpha(t, kind)
    (grad,) = torch.autograd.grad(ref.sum(), t)
    torch.testing.assert_close(alpha(t.detach()), ref.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(dalpha(t.detach()), grad, rtol=0, atol=1e-14)
    assert alpha(torch.tensor(0.0)) == 1.0 and alpha(torch.tensor(1.0)) == 0.0  # exact ends


def test_elbo_weight_is_one_over_t_for_linear_and_minus_dalpha_over_masked_for_cosine():
    t = torch.tensor([1e-4, 1e-3, 0.1, 1 / 3, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.equal(elbo_weight(t, "linear"), 1 / t)
    assert elbo_weight(torch.tensor([0.0, 1e-6]), "linear").tolist() == [1e4, 1e4]  # clamped at t = 1e-4
    tt = t.clone().requires_grad_(True)
    a = md4_alpha(tt, "cosine")
    (grad,) = torch.autograd.grad(a.sum(), tt)
    torch.testing.assert_close(elbo_weight(t, "cosine"), -grad / (1 - a.detach()), rtol=1e-12, atol=1e-15)


# ---- forward process ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_masking_frequency_is_one_minus_alpha(cfg, kind):
    """Observed through the network's input: sum of Bernoulli(1 - alpha(t)) over 192k tokens."""
    c = replace(cfg, schedule=kind)
    net = MDMBlock(c, 0)
    seen = _capture_z(net)
    n = 6000
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (n, c.seq_len + 1), generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    mdm_loss(net, (tokens,), t, torch.Generator().manual_seed(4))
    z, x = seen["z"], tokens[:, : c.seq_len]
    masked = z == c.mask_id
    assert torch.equal(z[~masked], x[~masked])  # unmasked tokens pass through unchanged
    p = 1 - md4_alpha(t, kind)[:, None].expand(n, c.seq_len)
    var = (p * (1 - p)).sum().item()
    assert abs(masked.sum().item() - p.sum().item()) < 5 * math.sqrt(var)
    # Per t-bin as well (a wrong dependence on t would cancel in the total).
    for lo in (0.0, 0.25, 0.5, 0.75):
        rows = (t >= lo) & (t < lo + 0.25)
        pb = p[rows]
        assert abs(masked[rows].sum().item() - pb.sum().item()) < 5 * math.sqrt((pb * (1 - pb)).sum().item())


def test_nothing_masked_at_t0_and_everything_at_t1(cfg, text_windows):
    net = MDMBlock(cfg, 1)
    seen = _capture_z(net)
    batch = (text_windows[:64],)
    x = text_windows[:64, : cfg.seq_len]
    loss0 = mdm_loss(net, batch, torch.zeros(64, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert torch.equal(seen["z"], x) and torch.equal(loss0, torch.zeros(64))
    loss1 = mdm_loss(net, batch, torch.ones(64, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert (seen["z"] == cfg.mask_id).all()
    # Zero head at init: uniform logits, so loss = w(1) * T * ln V / T = ln V (linear w(1) = 1).
    torch.testing.assert_close(loss1, torch.full((64,), LN_V), rtol=1e-6, atol=0)


def test_mask_edges_are_exact(cfg):
    """z_i = [M] iff u_i < 1 - alpha(t), u in [0, 1): u = 0 stays clean at t = 0, u -> 1 is masked at t = 1."""
    x = torch.tensor([[3, 4, 5]])
    u = torch.tensor([[0.0, 0.5, math.nextafter(1.0, 0)]], dtype=torch.float64)
    for kind in ("linear", "cosine"):
        z0, m0 = mask_tokens(x, torch.zeros(1, dtype=torch.float64), u, kind, cfg.mask_id)
        z1, m1 = mask_tokens(x, torch.ones(1, dtype=torch.float64), u, kind, cfg.mask_id)
        assert torch.equal(z0, x) and not m0.any()
        assert (z1 == cfg.mask_id).all() and m1.all()
    z, _ = mask_tokens(x, torch.full((1,), 0.5, dtype=torch.float64), u, "linear", cfg.mask_id)
    assert z.tolist() == [[cfg.mask_id, 4, 5]]  # 0.5 < 0.5 is false: strict


def test_loss_at_init_is_weight_times_masked_count_times_ln_v(cfg, text_windows):
    net = MDMBlock(cfg, 2)
    seen = _capture_z(net)
    n = 64
    t = torch.linspace(0.01, 1.0, n, dtype=torch.float64)
    loss = mdm_loss(net, (text_windows[:n],), t, torch.Generator().manual_seed(1))
    count = (seen["z"] == cfg.mask_id).sum(1).double()
    torch.testing.assert_close(loss.double(), (1 / t) * count * LN_V / cfg.seq_len, rtol=1e-5, atol=1e-6)


def test_loss_is_deterministic_given_the_generator(cfg, text_windows):
    with seeded(0):
        net = MDMBlock(cfg, 2)
    t = torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = (text_windows[:16],)
    a, b, c = (mdm_loss(net, batch, t, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert mdm_baseline_loss is mdm_loss


# ---- carry-over and the perfect predictor ---------------------------------------------------------
def test_unmasked_positions_never_contribute(cfg, text_windows):
    """Scramble the logits at every unmasked position: the loss is bit-identical."""
    with seeded(1):
        net = MDMBlock(cfg, 1)
        nn.init.normal_(net.head.weight)  # non-trivial logits

    class Scrambled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.mask_id, self.inner = net.cfg, net.mask_id, net

        def forward(self, z, t):
            out = self.inner(z, t)
            junk = 100 * torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
            return torch.where((z == cfg.mask_id)[..., None], out, junk)

    t = torch.linspace(0.05, 0.95, 32, dtype=torch.float64)
    batch = (text_windows[:32],)
    a = mdm_loss(net, batch, t, torch.Generator().manual_seed(5))
    b = mdm_loss(Scrambled(), batch, t, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and (a > 0).all()


def test_perfect_predictor_has_zero_loss(cfg, text_windows):
    n = 64
    x = text_windows[:n, : cfg.seq_len]
    t = torch.cat([torch.tensor([0.0, 1e-4, 1e-3]), torch.linspace(0.01, 1, n - 3)]).double()
    oracle = Oracle(cfg, x)
    loss = mdm_loss(oracle, (text_windows[:n],), t, torch.Generator().manual_seed(0))
    assert loss.max().item() < 1e-6
    # The sequence is tokens[:, :seq_len] (no next-token shift): an oracle of the shifted window fails.
    shifted = Oracle(cfg, text_windows[:n, 1 : cfg.seq_len + 1])
    wrong = mdm_loss(shifted, (text_windows[:n],), t, torch.Generator().manual_seed(0))
    assert wrong[t > 0.3].min() > 1.0


# ---- network: shapes, parameters, isolation -------------------------------------------------------
def _params_closed_form(cfg, num_layers: int) -> int:
    d, h, f, t = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.freq_dim, cfg.seq_len
    layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h + h * d + d) + (d * 6 * d + 6 * d)
    embed = (V + 1) * d + t * d + (f * d + d + d * d + d)  # tokens + mask, positions, t embedder
    head = (d * 2 * d + 2 * d) + (d * V + V)  # final adaLN, linear over the 84 real tokens
    return num_layers * layer + embed + head


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_build_shapes_and_parameter_accounting(cfg, num_blocks):
    plan = _plan(num_blocks)
    nets = [build_mdm(cfg, s, baseline=num_blocks == 1, seed=0) for s in plan]
    for net in nets:
        assert len(net.layers) == cfg.layers // num_blocks
        assert sum(p.numel() for p in net.parameters()) == _params_closed_form(cfg, len(net.layers))
        z = torch.full((5, 20), cfg.mask_id)
        out = net(z, torch.rand(5, dtype=torch.float64))
        assert out.shape == (5, 20, V)  # logits over real tokens only, never the mask
        assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: uniform logits at init
        with pytest.raises(ValueError, match="model.seq_len"):
            net(torch.zeros(1, cfg.seq_len + 1, dtype=torch.int64), torch.zeros(1))
    ptrs = [{p.data_ptr() for p in n.parameters()} for n in nets]
    for i in range(len(nets)):
        for j in range(i + 1, len(nets)):
            assert not ptrs[i] & ptrs[j]


def test_gradient_isolation_training_one_block_leaves_others_untouched(cfg, text_windows):
    plan = _plan(3)
    with seeded(0):
        nets = [build_mdm(cfg, s, baseline=False) for s in plan]
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    trainer = BlockTrainer(nets[1], plan[1], mdm_loss, TrainConfig(warmup_samples=0), TimeLevels(), 0)
    for i in range(3):
        out = trainer.step((text_windows[i * 16 : (i + 1) * 16],))
        assert ((out["sigma"] >= 1 / 3) & (out["sigma"] <= 2 / 3)).all()  # t from block 1's interval
    assert all(p.grad is not None for p in nets[1].parameters())  # every parameter takes part
    for b in (0, 2):
        assert all(p.grad is None for p in nets[b].parameters())
        assert all(torch.equal(v, before[b][k]) for k, v in nets[b].state_dict().items())
    assert not all(torch.equal(v, before[1][k]) for k, v in nets[1].state_dict().items())


# ---- ancestral sampling ---------------------------------------------------------------------------
def _biased_nets(cfg, plan, tokens):
    """Nets whose block b always predicts token tokens[b] (head bias): the output shows who unmasked.
    (No layers: the logits come from the head bias alone, so this is cheap.)"""
    nets = [MDMBlock(cfg, 0) for _ in plan]
    for net, tok in zip(nets, tokens):
        with torch.no_grad():
            net.head.bias[tok] = 50.0
    return nets


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_sampling_routes_each_step_to_the_block_owning_t(cfg, kind):
    """From t to s a token is unmasked with unconditional probability alpha(s) - alpha(t); each
    step's block leaves its own token, so token b's frequency is alpha's rise over block b's steps."""
    c = replace(cfg, schedule=kind)
    plan = _plan(3, kind)
    nets = _biased_nets(c, plan, [5, 17, 60])
    num, steps = 192, 64
    ids = sample_mdm(nets, plan, TimeLevels(kind), num, c.seq_len, steps=steps, seed=0)
    assert ids.shape == (num, c.seq_len) and set(ids.unique().tolist()) <= {5, 17, 60}
    grid = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    bounds = partition_times(3, kind)
    owner = route(grid[:-1], bounds)
    rise = md4_alpha(grid[1:], kind) - md4_alpha(grid[:-1], kind)
    m = ids.numel()
    for b, tok in enumerate([5, 17, 60]):
        p = rise[owner == b].sum().item()
        assert abs((ids == tok).double().mean().item() - p) < binomial_tol(p, m), (b, p)
    if kind == "linear":
        assert [int((owner == b).sum()) for b in range(3)] == [22, 21, 21]


def test_sampling_unmasks_everything_with_real_tokens_and_is_deterministic(cfg):
    plan = _plan(2)
    with seeded(3):
        nets = [build_mdm(cfg, s, baseline=False) for s in plan]
    for steps in (1, 7, 64):
        a = sample_mdm(nets, plan, TimeLevels(), 8, cfg.seq_len, steps=steps, seed=1)
        assert a.dtype == torch.int64 and ((a >= 0) & (a < V)).all()  # no mask left, never the mask id
        assert torch.equal(a, sample_mdm(nets, plan, TimeLevels(), 8, cfg.seq_len, steps=steps, seed=1))
    assert not torch.equal(a, sample_mdm(nets, plan, TimeLevels(), 8, cfg.seq_len, steps=64, seed=2))


def test_reverse_step_keeps_unmasked_tokens_and_unmasks_at_the_md4_rate(cfg):
    net = _biased_nets(cfg, _plan(1), [7])[0]
    step = mdm_denoiser(net)
    n, length = 400, cfg.seq_len
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, V, (n, length), generator=g)
    z[torch.rand(n, length, generator=g) < 0.6] = cfg.mask_id
    t, s = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 0.2, dtype=torch.float64)
    u = torch.rand(n, length, generator=g, dtype=torch.float64)
    out = step(z, t, s=s, u=u, gumbel=torch.zeros(n, length, V))
    was = z == cfg.mask_id
    assert torch.equal(out[~was], z[~was])  # carry-over
    revealed = was & (out != cfg.mask_id)
    assert (out[revealed] == 7).all()
    p = (0.5 - 0.2) / 0.5  # (alpha(s) - alpha(t)) / (1 - alpha(t)), linear
    k = int(was.sum())
    assert abs(revealed.sum().item() / k - p) < binomial_tol(p, k)


# ---- evaluation -----------------------------------------------------------------------------------
def _split(text_windows) -> TextSplit:
    return TextSplit(train=text_windows[:-200], val=text_windows[-200:-100], test=text_windows[-100:])


def test_elbo_of_uniform_and_unigram_predictors(cfg, text_windows):
    """Predictors that ignore the context have a closed-form ELBO: the cross-entropy of their
    per-character distribution (log2 V for uniform logits). MC std here ~1%; bound 3%."""
    split = _split(text_windows)
    test = split.test[:, : cfg.seq_len]
    for num_blocks in (1, 3):
        plan = _plan(num_blocks)
        # Any untrained net has uniform logits; the B=1 net has no layers, to keep this cheap.
        nets = [build_mdm(cfg, s, baseline=False) for s in plan] if num_blocks == 3 else [MDMBlock(cfg, 0)]
        kw = dict(windows=100, t_samples=16, sample_chars=70, steps=16)
        res = evaluate_mdm(nets, plan, split, TimeLevels(), **kw)
        assert res["test_bpc"] == pytest.approx(math.log2(V), rel=0.03)
        lines = res["sample_text"].split("\n")
        assert len(lines) == 3 and all(len(x) == cfg.seq_len and set(x) <= set(VOCAB) for x in lines)
        if num_blocks == 1:
            uniform_b1 = res["test_bpc"]
    # Same draws for every model: three untrained blocks give the single untrained block's value.
    assert res["test_bpc"] == pytest.approx(uniform_b1, rel=1e-12)
    freq = torch.bincount(test.flatten(), minlength=V).double() + 1e-3
    logp = (freq / freq.sum()).log()
    unigram_bits = -logp[test].mean().item() / math.log(2)
    plan = _plan(1)
    net = MDMBlock(cfg, 0)
    with torch.no_grad():
        net.head.bias.copy_(logp.float())
    got = elbo_bpc([net], plan, split.test, seed=0, t_samples=16)
    assert got == pytest.approx(unigram_bits, rel=0.03) and got < math.log2(V) - 1
    assert elbo_bpc([net], plan, split.test, seed=0, t_samples=16, batch_size=37) == pytest.approx(got, rel=1e-6)
    assert elbo_bpc([net], plan, split.test, seed=1, t_samples=16) != got


def test_evaluation_sends_each_t_to_the_block_owning_it(cfg):
    plan = _plan(3)
    nets = _biased_nets(cfg, plan, [5, 17, 60])
    t = torch.tensor([1.0, 0.8, 2 / 3, 0.5, 1 / 3, 0.1, 0.0], dtype=torch.float64)
    logits = routed_logits(nets, plan_boundaries(plan), torch.full((7, 4), cfg.mask_id), t)
    assert logits.argmax(-1)[:, 0].tolist() == [5, 5, 5, 17, 17, 60, 60]


# ---- training -------------------------------------------------------------------------------------
def test_short_debug_training_lowers_the_block_loss(cfg, text_windows):
    """Block 0 of 3 (t in [2/3, 1], the noisiest) trained 40 steps: held-out loss at the same t and masks
    drops from ln V (uniform logits) towards the character entropy."""
    plan = _plan(3)
    with seeded(0):
        net = build_mdm(cfg, plan[0], baseline=False)
    held = (text_windows[-256:],)
    t = torch.linspace(2 / 3, 1, 256, dtype=torch.float64)

    def held_loss():
        with torch.no_grad():
            return mdm_loss(net.eval(), held, t, torch.Generator().manual_seed(0)).mean().item()

    before = held_loss()
    train_cfg = TrainConfig(warmup_samples=0, lr=3e-3)
    trainer = BlockTrainer(net, plan[0], mdm_loss, train_cfg, TimeLevels(), 0)
    g = torch.Generator().manual_seed(1)
    train = text_windows[:-256]
    for _ in range(40):
        trainer.step((train[torch.randint(0, len(train), (32,), generator=g)],))
    after = held_loss()
    assert before == pytest.approx(LN_V, rel=0.1)  # uniform logits at init
    assert after < 0.8 * before, (before, after)


# ---- config -------------------------------------------------------------------------------------
def test_mdm_size_registry_and_validation():
    assert set(MDM_SIZES) == {"debug", "tiny"}
    tiny = mdm_config("tiny")
    assert (tiny.width, tiny.heads, tiny.layers, tiny.seq_len, tiny.vocab_size, tiny.mask_id) == (64, 4, 6, 64, 84, 84)
    debug = mdm_config("debug")
    assert (debug.width, debug.heads, debug.layers, debug.seq_len, debug.freq_dim) == (32, 2, 6, 32, 32)
    assert mdm_config("debug", schedule="cosine", layers=None).schedule == "cosine"
    for key, bad in [("heads", 5), ("layers", 0), ("schedule", "sqrt"), ("seq_len", 0), ("freq_dim", 3)]:
        with pytest.raises(ValueError, match=f"model.{key}"):
            mdm_config("debug", **{key: bad})
    with pytest.raises(ValueError, match="model.patch"):
        mdm_config("debug", patch=2)
