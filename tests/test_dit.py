"""The DiT block model (design.md 1.5, 2.1): shapes, adaLN-Zero init, parameter accounting, dit_loss."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dblocks import DIT_SIZES, DiTBlock, denoise, dit_config, dit_loss, seeded
from helpers import SIGMA_DATA


def _layer_params_closed_form(cfg) -> int:
    d, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
    qkv = d * 3 * d + 3 * d
    proj = d * d + d
    mlp = d * h + h + h * d + d
    ada = d * 6 * d + 6 * d
    return qkv + proj + mlp + ada  # LayerNorms have no affine parameters


def _embed_head_params_closed_form(cfg) -> int:
    d, p, c = cfg.width, cfg.patch, cfg.channels
    patch = c * p * p * d + d
    sigma = cfg.freq_dim * d + d + d * d + d
    label = (cfg.num_classes + 1) * d  # + the "no label" row for CFG
    final_ada = d * 2 * d + 2 * d
    head = d * p * p * c + p * p * c
    return patch + sigma + label + final_ada + head


def _count(params) -> int:
    return sum(p.numel() for p in params)


# ---- 14. shapes and parameter accounting ------------------------------------------------------
@pytest.mark.parametrize("num_layers", [0, 1, 2, 6])
def test_dit_block_output_shape_equals_input_image_shape(debug_cfg, num_layers):
    net = DiTBlock(debug_cfg, num_layers)
    x = torch.randn(5, 1, 8, 8)
    out = net(x, torch.linspace(-1.5, 1.0, 5), torch.tensor([0, 3, 9, 10, 1]))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_dit_block_shape_with_other_geometry():
    cfg = replace(dit_config("debug"), image_size=16, channels=3, patch=4)
    net = DiTBlock(cfg, 1)
    x = torch.randn(2, 3, 16, 16)
    assert net(x, torch.zeros(2), torch.tensor([0, 10])).shape == x.shape


def test_parameter_counts_match_closed_forms(debug_cfg):
    net = DiTBlock(debug_cfg, 2)
    per_layer = _layer_params_closed_form(debug_cfg)
    assert _count(net.layers.parameters()) == 2 * per_layer
    assert _count(net.parameters()) == 2 * per_layer + _embed_head_params_closed_form(debug_cfg)
    # The position embedding is fixed, not trainable.
    assert "pos_embed" not in dict(net.named_parameters())


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 6])
def test_block_split_param_accounting(debug_cfg, num_blocks):
    """Sum over blocks of layer params == the end-to-end model's layer params; each block adds its
    own embeddings + head, so the total exceeds the E2E total by exactly (B-1) of those."""
    L = debug_cfg.layers
    e2e = DiTBlock(debug_cfg, L)
    blocks = [DiTBlock(debug_cfg, L // num_blocks) for _ in range(num_blocks)]
    layer_sum = sum(_count(b.layers.parameters()) for b in blocks)
    assert layer_sum == _count(e2e.layers.parameters())
    non_layer = [_count(p for n, p in b.named_parameters() if not n.startswith("layers.")) for b in blocks]
    assert len(set(non_layer)) == 1  # every block carries the same embedding/head set
    assert non_layer[0] == _count(e2e.parameters()) - _count(e2e.layers.parameters())
    assert non_layer[0] == _embed_head_params_closed_form(debug_cfg)
    total = sum(_count(b.parameters()) for b in blocks)
    assert total - _count(e2e.parameters()) == (num_blocks - 1) * non_layer[0]


def test_blocks_share_no_parameter_storage(debug_cfg):
    blocks = [DiTBlock(debug_cfg, 2) for _ in range(3)]
    ids = [{id(p) for p in b.parameters()} for b in blocks]
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in blocks]
    for i in range(3):
        assert len(ptrs[i]) == len(list(blocks[i].parameters()))  # no tying inside a block either
        for j in range(i + 1, 3):
            assert not ids[i] & ids[j]
            assert not ptrs[i] & ptrs[j]


# ---- adaLN-Zero init ----------------------------------------------------------------------------
def test_dit_at_init_outputs_zero_so_denoiser_is_c_skip_z(debug_cfg):
    net = DiTBlock(debug_cfg, 2)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 10.0, 80.0])
    labels = torch.tensor([0, 1, 5, 9, 10, 2])
    assert torch.equal(net(z, sigma.log() / 4, labels), torch.zeros_like(z))  # zero head: F = 0 exactly
    d = denoise(net, z, sigma, labels)
    c_skip = (SIGMA_DATA**2 / (sigma.double() ** 2 + SIGMA_DATA**2)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d.double(), c_skip * z.double(), rtol=1e-6, atol=0)


def test_seeded_init_is_reproducible(debug_cfg):
    with seeded(11):
        a = DiTBlock(debug_cfg, 2)
    with seeded(11):
        b = DiTBlock(debug_cfg, 2)
    with seeded(12):
        c = DiTBlock(debug_cfg, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---- dit_loss ---------------------------------------------------------------------------------
def _capture_inputs(net):
    seen = {}

    def hook(module, args):
        seen["x_in"], seen["c_noise"], seen["labels"] = (a.detach().clone() for a in args)

    net.register_forward_pre_hook(hook)
    return seen


def test_dit_loss_noises_the_image_and_weights_the_l2_error(debug_cfg):
    """Observe the network's inputs: z = y + sigma eps with eps ~ N(0, I); at init D = c_skip z,
    so the loss is exactly w(sigma) mean((c_skip z - y)^2)."""
    net = DiTBlock(debug_cfg, 1)
    seen = _capture_inputs(net)
    n = 256
    g = torch.Generator().manual_seed(5)
    y = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (n,), generator=g)
    sigma = torch.exp(torch.empty(n).uniform_(math.log(0.002), math.log(80.0), generator=g))
    loss = dit_loss(net, (y, labels), sigma, torch.Generator().manual_seed(6), SIGMA_DATA)
    assert loss.shape == (n,)
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(s**2 + SIGMA_DATA**2)
    z = seen["x_in"].double() / c_in
    torch.testing.assert_close(seen["c_noise"].double(), sigma.double().log() / 4, rtol=1e-6, atol=1e-7)
    eps = (z - y.double()) / s
    # 16384 standard normals: mean within 5/sqrt(n) and variance within 5 sqrt(2/n).
    m = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(m)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / m)
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    w = ((s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2).flatten()
    expected = w * (c_skip * z - y.double()).square().mean((1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=0)


def test_dit_loss_at_init_has_unit_expectation_for_unit_scale_data(debug_cfg):
    """With y ~ N(0, sd^2) and F = 0: w E[(c_skip z - y)^2] = w c_out^2 = 1 at every sigma.
    Per sample the loss is a mean of 64 chi^2_1, so the batch mean has std sqrt(2/64/n)."""
    net = DiTBlock(debug_cfg, 1)
    n = 512
    g = torch.Generator().manual_seed(7)
    y = SIGMA_DATA * torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    for sig in (0.002, 0.3, 80.0):
        sigma = torch.full((n,), sig)
        loss = dit_loss(net, (y, labels), sigma, torch.Generator().manual_seed(8), SIGMA_DATA)
        assert abs(loss.double().mean().item() - 1.0) < 5 * math.sqrt(2 / 64 / n), sig


def test_dit_loss_drops_labels_at_the_configured_rate(debug_cfg):
    net = DiTBlock(debug_cfg, 0)
    seen = _capture_inputs(net)
    n = 4000
    labels = torch.arange(n) % 10
    batch = (torch.zeros(n, 1, 8, 8), labels)
    dit_loss(net, batch, torch.full((n,), 0.5), torch.Generator().manual_seed(9))
    got = seen["labels"]
    dropped = got == debug_cfg.num_classes
    assert torch.equal(got[~dropped], labels[~dropped])  # kept labels are unchanged
    p = debug_cfg.label_dropout
    assert p == 0.1  # design.md: 10% label dropout for CFG
    assert abs(dropped.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # No dropout configured: no label is replaced.
    net0 = DiTBlock(replace(debug_cfg, label_dropout=0.0), 0)
    seen0 = _capture_inputs(net0)
    dit_loss(net0, batch, torch.full((n,), 0.5), torch.Generator().manual_seed(9))
    assert torch.equal(seen0["labels"], labels)


def test_dit_loss_is_deterministic_given_the_generator(debug_cfg, image_batch):
    with seeded(0):
        net = DiTBlock(debug_cfg, 2)
    sigma = torch.tensor([0.002, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0])
    a = dit_loss(net, image_batch, sigma, torch.Generator().manual_seed(1))
    b = dit_loss(net, image_batch, sigma, torch.Generator().manual_seed(1))
    c = dit_loss(net, image_batch, sigma, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- config registry ----------------------------------------------------------------------------
def test_dit_size_registry_and_validation():
    assert {"debug", "tiny", "small"} <= set(DIT_SIZES)
    assert dit_config("debug", layers=12).layers == 12
    assert dit_config("debug", layers=None) == DIT_SIZES["debug"]
    with pytest.raises(ValueError, match="model.size"):
        dit_config("huge")
    with pytest.raises(ValueError, match="model.patch"):
        dit_config("debug", patch=3)
    with pytest.raises(ValueError, match="model.heads"):
        dit_config("debug", heads=5)
    with pytest.raises(ValueError, match="model.layers"):
        dit_config("debug", layers=0)
