"""The ViT classification family (design.md 1.5, 2.1): label token, fixed table, Eq. 6 CE, chaining."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks import (
    BlockTrainer,
    TrainConfig,
    inference_sigmas,
    load_digits_split,
    make_plan,
    plan_boundaries,
    route,
    seeded,
)
from dblocks.data import BatchStream
from dblocks.embedding import fixed_embedding
from dblocks.families.vit import evaluate_vit, predict_vit, vit_baseline_loss, vit_denoiser, vit_loss
from dblocks.levels import SigmaLevels
from dblocks.models.layers import PreLNLayer
from dblocks.models.vit import VIT_SIZES, ViTBaseline, ViTBlock, build_vit, vit_config
from dblocks.seeds import block_seed
from helpers import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

LEVELS = SigmaLevels()
SIGMAS = torch.tensor([0.002, 0.02, 0.18, 0.3, 0.5, 2.0, 10.0, 80.0])


@pytest.fixture
def cfg():
    return vit_config("debug")


def _block(cfg, spec, seed=0, init=0):
    with seeded(init):
        return build_vit(cfg, spec, baseline=False, seed=seed)


def _randomize(net, seed=0, std=0.2):
    """Non-zero weights everywhere (adaLN-Zero gates and head start at 0), for path tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return net


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 10


def _scalings(sigma):
    """EDM Table 1, written out (design.md 1.1)."""
    s = sigma.double()[:, None]
    return (
        SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2),  # c_skip
        s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt(),  # c_out
        1 / (s**2 + SIGMA_DATA**2).sqrt(),  # c_in
    )


def _weight(sigma):
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


# ---- config ---------------------------------------------------------------------------------------
def test_size_registry_and_validation():
    assert set(VIT_SIZES) == {"debug", "tiny", "s4"}
    d, t = vit_config("debug"), vit_config("tiny")
    assert (d.width, d.heads, d.layers, d.freq_dim) == (32, 2, 6, 32)
    assert (t.width, t.heads, t.layers, t.freq_dim, t.patch, t.mlp_ratio) == (64, 4, 12, 64, 2, 4.0)
    assert vit_config("tiny", layers=6).layers == 6
    for bad, key in [
        ({"patch": 3}, "model.patch"),
        ({"heads": 5}, "model.heads"),
        ({"layers": 0}, "model.layers"),
        ({"freq_dim": 31}, "model.freq_dim"),
        ({"size": "huge"}, "model.size"),
    ]:
        size = bad.pop("size", "debug")
        with pytest.raises(ValueError, match=key):
            vit_config(size, **bad)
    with pytest.raises(ValueError, match="model.depth"):
        vit_config("debug", depth=3)


# ---- shapes, ownership, the fixed table -------------------------------------------------------------
def test_block_and_baseline_shapes_and_depth(cfg):
    plan = make_plan(LEVELS, 3, 6)
    x, y = _batch(5)
    net = _block(cfg, plan[1])
    assert isinstance(net, ViTBlock) and len(net.layers) == 2
    z = torch.randn(5, cfg.width)
    assert net(z, SIGMAS[:5], x).shape == (5, 10)
    base = build_vit(cfg, make_plan(LEVELS, 1, 6)[0], baseline=True, seed=0)
    assert isinstance(base, ViTBaseline) and len(base.layers) == 6
    assert all(isinstance(layer, PreLNLayer) and not layer.causal for layer in base.layers)
    assert base(x).shape == (5, 10)
    names = dict(base.named_parameters())
    assert isinstance(names["cls_token"], torch.nn.Parameter) and names["cls_token"].shape == (1, 1, cfg.width)
    assert not any(k.startswith(("sigma_embed", "label_table")) for k in base.state_dict())


def test_block_layer_params_sum_to_the_one_block_model(cfg):
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    for b in (2, 3, 6):
        blocks = [_block(cfg, spec) for spec in make_plan(LEVELS, b, 6)]
        whole = _block(cfg, make_plan(LEVELS, 1, 6)[0])
        assert sum(count(n.layers.parameters()) for n in blocks) == count(whole.layers.parameters())
        extra = count(whole.parameters()) - count(whole.layers.parameters())
        assert sum(count(n.parameters()) for n in blocks) - count(whole.parameters()) == (b - 1) * extra


def test_fixed_table_is_the_run_seeds_unit_norm_buffer(cfg):
    spec0, spec1 = make_plan(LEVELS, 3, 6)[:2]
    a, b = _block(cfg, spec0, seed=7, init=1), _block(cfg, spec1, seed=7, init=2)
    c = _block(cfg, spec0, seed=8, init=1)
    assert torch.equal(a.label_table, b.label_table)  # every block agrees, whatever its init seed
    assert torch.equal(a.label_table, fixed_embedding(10, cfg.width, 7))
    assert not torch.allclose(a.label_table, c.label_table)
    assert a.label_table.shape == (10, cfg.width)
    torch.testing.assert_close(a.label_table.double().norm(dim=1), torch.ones(10, dtype=torch.float64))
    assert "label_table" not in dict(a.named_parameters()) and not a.label_table.requires_grad
    assert "label_table" in a.state_dict()  # persistent: an exported block is self-contained
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.label_table, a.label_table)


def test_fixed_table_gets_no_gradient_and_training_leaves_it(cfg):
    spec = make_plan(LEVELS, 3, 6)[2]
    net = _block(cfg, spec)
    table = net.label_table.clone()
    x, y = _batch(16)
    trainer = BlockTrainer(net, spec, vit_loss, TrainConfig(batch_size=16, lr=1e-2, warmup_samples=0), LEVELS, 0)
    for _ in range(3):
        trainer.step((x, y))
    assert net.label_table.grad is None
    assert torch.equal(net.label_table, table)
    assert all(p.grad is not None for p in net.parameters())  # every parameter does get a gradient


def test_blocks_share_no_storage_and_gradients_stay_in_their_block(cfg):
    plan = make_plan(LEVELS, 3, 6)
    nets = [_block(cfg, spec, init=i) for i, spec in enumerate(plan)]
    ptrs = [{t.data_ptr() for t in n.state_dict().values()} for n in nets]
    for i in range(3):
        assert len(ptrs[i]) == len(nets[i].state_dict())
        for j in range(i + 1, 3):
            assert not ptrs[i] & ptrs[j]
    x, y = _batch(8)
    vit_loss(nets[1], (x, y), SIGMAS, torch.Generator().manual_seed(0)).mean().backward()
    assert all(p.grad is not None for p in nets[1].parameters())
    assert all(p.grad is None for n in (nets[0], nets[2]) for p in n.parameters())


# ---- the label token: c_in on slot 0 only, skip before the classifier ------------------------------------
def _capture(net):
    seen = {}
    net.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0].detach().clone()))
    net.layers[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("h", out.detach().clone()))
    net.final_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("u", args[0].detach().clone()))
    return seen


def test_c_in_scales_only_the_label_token(cfg):
    net = _randomize(_block(cfg, make_plan(LEVELS, 3, 6)[0]))
    seen = _capture(net)
    x, _ = _batch(8)
    z = torch.randn(8, cfg.width, generator=torch.Generator().manual_seed(3))
    net(z, SIGMAS, x)
    tok = seen["tokens"]
    _, _, c_in = _scalings(SIGMAS)
    torch.testing.assert_close(tok[:, 0].double(), c_in * z.double(), rtol=1e-6, atol=1e-7)  # pos row 0 is zero
    patches = net.patch_embed(x).flatten(2).transpose(1, 2) + net.pos_embed[1:]
    torch.testing.assert_close(tok[:, 1:], patches.detach(), rtol=0, atol=0)  # images enter unscaled
    # Another sigma, another z: the image tokens are bit-identical; other images: the label token is.
    net(3 * z, SIGMAS.flip(0), x)
    assert torch.equal(seen["tokens"][:, 1:], tok[:, 1:])
    net(z, SIGMAS, -x)
    assert torch.equal(seen["tokens"][:, 0], tok[:, 0]) and not torch.equal(seen["tokens"][:, 1:], tok[:, 1:])


def test_classifier_reads_c_out_h_plus_c_skip_z(cfg):
    net = _randomize(_block(cfg, make_plan(LEVELS, 3, 6)[1]))
    seen = _capture(net)
    x, _ = _batch(8)
    z = torch.randn(8, cfg.width, generator=torch.Generator().manual_seed(4))
    logits = net(z, SIGMAS, x)
    c_skip, c_out, _ = _scalings(SIGMAS)
    torch.testing.assert_close(
        seen["u"].double(), c_out * seen["h"][:, 0].double() + c_skip * z.double(), rtol=1e-5, atol=1e-6
    )
    # Hand-written final adaLN + linear classifier on u.
    c = net.sigma_embed(torch.cat(_fourier(SIGMAS.log() / 4, cfg.freq_dim), 1))
    shift, scale = net.final_ada(c).chunk(2, 1)
    u = seen["u"]
    un = (u - u.mean(1, keepdim=True)) / (u.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(logits, net.head(un * (1 + scale) + shift), rtol=1e-4, atol=1e-5)


def _fourier(c_noise, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    ang = 250.0 * c_noise[:, None] * freqs[None]
    return ang.cos(), ang.sin()


def test_at_init_logits_are_zero_and_denoiser_is_the_table_mean(cfg):
    net = _block(cfg, make_plan(LEVELS, 3, 6)[0])
    x, _ = _batch(8)
    z = torch.randn(8, cfg.width)
    assert torch.equal(net(z, SIGMAS, x), torch.zeros(8, 10))  # zero head
    d = vit_denoiser(net)(z, SIGMAS, images=x)
    torch.testing.assert_close(d, net.label_table.mean(0).expand(8, -1))  # softmax(0) @ E


def test_denoiser_is_softmax_logits_times_table(cfg):
    net = _randomize(_block(cfg, make_plan(LEVELS, 3, 6)[2]))
    x, _ = _batch(8)
    z = torch.randn(8, cfg.width)
    with torch.no_grad():
        logits = net(z, SIGMAS, x)
    expected = torch.exp(logits - logits.logsumexp(1, keepdim=True)) @ net.label_table
    torch.testing.assert_close(vit_denoiser(net)(z, SIGMAS, images=x), expected)


# ---- losses ----------------------------------------------------------------------------------------
def test_vit_loss_is_weighted_ce_of_the_noisy_label_by_hand(cfg):
    net = _randomize(_block(cfg, make_plan(LEVELS, 3, 6)[0]), std=0.1)
    x, y = _batch(8)
    loss = vit_loss(net, (x, y), SIGMAS, torch.Generator().manual_seed(11))
    eps = torch.randn(8, cfg.width, generator=torch.Generator().manual_seed(11))  # the generator's first draw
    z = net.label_table[y] + SIGMAS[:, None] * eps
    logits = net(z, SIGMAS, x).double()
    ce = -(logits - logits.logsumexp(1, keepdim=True)).gather(1, y[:, None])[:, 0]
    assert loss.shape == (8,)
    torch.testing.assert_close(loss.double(), _weight(SIGMAS) * ce, rtol=1e-5, atol=0)


def test_vit_loss_at_init_is_w_log_k(cfg):
    """Zero head: logits 0, CE = ln 10 exactly, so the loss is w(sigma) ln 10 at every sigma."""
    x, y = _batch(8)
    loss = vit_loss(_block(cfg, make_plan(LEVELS, 3, 6)[0]), (x, y), SIGMAS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.double(), _weight(SIGMAS) * math.log(10), rtol=1e-6, atol=0)


def test_vit_loss_is_deterministic_given_the_generator(cfg):
    net = _randomize(_block(cfg, make_plan(LEVELS, 3, 6)[0]))
    batch = _batch(8)
    a, b, c = (vit_loss(net, batch, SIGMAS, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_baseline_loss_is_plain_ce_and_ignores_sigma(cfg):
    net = _randomize(build_vit(cfg, make_plan(LEVELS, 1, 6)[0], baseline=True, seed=0), std=0.1)
    x, y = _batch(8)
    a = vit_baseline_loss(net, (x, y), SIGMAS, torch.Generator().manual_seed(0))
    b = vit_baseline_loss(net, (x, y), SIGMAS.flip(0) * 7, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    logits = net(x).double()
    ce = -(logits - logits.logsumexp(1, keepdim=True)).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(a.double(), ce, rtol=1e-6, atol=0)


# ---- inference: B calls, one per block ------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6])
def test_b_point_grid_puts_one_point_in_each_block_range(num_blocks):
    plan = make_plan(LEVELS, num_blocks, 12)
    grid = inference_sigmas(num_blocks)
    assert grid[0] == SIGMA_MAX and grid[-1] == SIGMA_MIN and len(grid) == num_blocks
    assert route(grid, plan_boundaries(plan)).tolist() == list(range(num_blocks))
    for j, s in enumerate(grid.tolist()):
        assert plan[j].lo <= s <= plan[j].hi


@pytest.mark.parametrize("num_blocks", [1, 3, 6])
def test_prediction_calls_each_block_exactly_once(cfg, num_blocks):
    plan = make_plan(LEVELS, num_blocks, 6)
    nets = [_randomize(_block(cfg, spec), seed=i) for i, spec in enumerate(plan)]
    x, _ = _batch(12)
    pred = predict_vit(nets, plan, x, LEVELS, seed=3)
    assert dict(pred.router.calls) == {b: 1 for b in range(num_blocks)}
    assert pred.labels.shape == (12,) and torch.equal(pred.labels, pred.logits.argmax(1))


def test_prediction_matches_the_chain_written_out(cfg):
    """design.md 1.4 by hand: z ~ N(0, 80^2), call the block owning each grid sigma, Euler step
    z + (s' - s)(z - D)/s with D = softmax(logits) @ E; predict argmax of the final call's logits."""
    plan = make_plan(LEVELS, 3, 6)
    nets = [_randomize(_block(cfg, spec), seed=i) for i, spec in enumerate(plan)]
    x, _ = _batch(12)
    pred = predict_vit(nets, plan, x, LEVELS, seed=5)
    z = SIGMA_MAX * torch.randn(12, cfg.width, generator=torch.Generator().manual_seed(5))
    grid = inference_sigmas(3).tolist()
    with torch.no_grad():
        for b, s in enumerate(grid):
            logits = nets[b](z, torch.full((12,), s, dtype=torch.float64), x)
            if b < 2:
                d = logits.softmax(1) @ nets[b].label_table
                z = z + (grid[b + 1] - s) * (z - d) / s
    torch.testing.assert_close(pred.logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred.labels, logits.argmax(1))
    again = predict_vit(nets, plan, x, LEVELS, seed=5)
    assert torch.equal(again.logits, pred.logits)
    assert not torch.equal(predict_vit(nets, plan, x, LEVELS, seed=6).logits, pred.logits)


def test_evaluate_baseline_is_one_forward_accuracy(cfg):
    net = _randomize(build_vit(cfg, make_plan(LEVELS, 1, 6)[0], baseline=True, seed=0), std=0.1)
    split = load_digits_split()
    out = evaluate_vit([net], make_plan(LEVELS, 1, 6), split, LEVELS, baseline=True)
    with torch.no_grad():
        acc = (net(split.test_x).argmax(1) == split.test_y).double().mean().item()
    assert out["test_accuracy"] == acc and 0.0 <= out["train_accuracy"] <= 1.0


# ---- a short training: the loss falls and the chained blocks classify ------------------------------------
@torch.no_grad()
def _heldout(net, spec, split) -> float:
    """Mean vit_loss on the test images, log-uniform sigma in the block's range, fixed draws."""
    g = torch.Generator().manual_seed(0)
    log_sigma = torch.empty(len(split.test_y)).uniform_(math.log(spec.lo), math.log(spec.hi), generator=g)
    return vit_loss(net, (split.test_x, split.test_y), log_sigma.exp(), g).mean().item()


@pytest.fixture(scope="module")
def trained():
    """B=3 blocks of 2 debug layers, 200 steps each at batch 64 (~13 s on one idle thread)."""
    cfg, plan, split = vit_config("debug"), make_plan(LEVELS, 3, 6), load_digits_split()
    train = TrainConfig(steps=200, batch_size=64, lr=5e-3, warmup_samples=640)
    nets, before, after = [], [], []
    for spec in plan:
        with seeded(block_seed(0, spec.index, "init")):
            net = build_vit(cfg, spec, baseline=False, seed=0)
        trainer = BlockTrainer(net, spec, vit_loss, train, LEVELS, seed=0)
        before.append(_heldout(net, spec, split))
        stream = BatchStream(len(split.train_y), 64, spec.index)
        for step in range(train.steps):
            i = stream.indices(step)
            trainer.step((split.train_x[i], split.train_y[i]))
        after.append(_heldout(net, spec, split))
        nets.append(net)
    return nets, plan, split, before, after


def test_short_training_lowers_every_blocks_heldout_loss(trained):
    _, _, _, before, after = trained
    for b, (l0, l1) in enumerate(zip(before, after)):
        assert l1 < 0.5 * l0, (b, l0, l1)


def test_short_training_chained_blocks_classify_test_digits(trained):
    nets, plan, split, _, _ = trained
    out = evaluate_vit(nets, plan, split, LEVELS, baseline=False, seed=0)
    assert out["test_accuracy"] >= 0.5, out  # chance is 0.1
