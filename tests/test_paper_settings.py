"""The paper's settings as options (issue 15): DiT guidance 2.0, MDM overlap gamma = 0.05, and the
ViT readout order of the official code (the final LayerNorm before the EDM skip)."""

from __future__ import annotations

import pytest
import torch

from dblocks.build import build_block, model_plans
from dblocks.models.dit import fourier_features
from dblocks.precond import edm_scalings
from worker.config import load_run_config


def _run(family: str, data: str, **sections):
    return load_run_config(
        {
            "model": {"family": family, "size": "debug", **sections.pop("model", {})},
            "data": {"source": data},
            **sections,
        }
    )


def test_dit_guidance_two_is_the_scale_sampled_with():
    assert _run("dit", "digits", sample={"guidance": 2.0}).sample.guidance_scale(True) == 2.0
    assert _run("dit", "digits").sample.guidance_scale(True) == 1.5  # the default is unchanged


def test_mdm_gamma_widens_each_t_interval_by_gamma_times_its_width():
    base = model_plans(_run("mdm", "text", blocks={"num": 3, "gamma": 0.0}))["blocks"]
    paper = model_plans(_run("mdm", "text", blocks={"num": 3, "gamma": 0.05}))["blocks"]
    for b, p in zip(base, paper):
        d = 0.05 * (b.hi - b.lo)
        assert (b.train_lo, b.train_hi) == (b.lo, b.hi)
        assert p.train_lo == pytest.approx(max(b.lo - d, 0.0), abs=1e-15)
        assert p.train_hi == pytest.approx(min(b.hi + d, 1.0), abs=1e-15)
    assert [(p.lo, p.hi) for p in paper] == [(b.lo, b.hi) for b in base]  # routing is unchanged


def _logits_and_oracle(readout: str):
    """The block's logits and the readout written out from its own parts: h (last layer's token 0)
    and c (the sigma embedding), captured by hooks, then the two orders of Sec. 3.4's readout."""
    run = _run("vit", "digits", model={"readout": readout})
    spec = model_plans(run)["blocks"][0]
    net = build_block(run, spec).eval()
    for p in net.parameters():  # leave adaLN-Zero's zero init: every term must matter
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(p.numel()))
    seen = {}
    net.layers[-1].register_forward_hook(lambda m, i, out: seen.__setitem__("h", out[:, 0]))
    net.sigma_embed.register_forward_hook(lambda m, i, out: seen.__setitem__("c", out))
    g = torch.Generator().manual_seed(0)
    n, cfg = 4, net.cfg
    z = torch.randn(n, cfg.width, generator=g)
    sigma = torch.tensor([0.01, 0.3, 1.0, 20.0])
    images = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    logits = net(z, sigma, images)
    c_skip, c_out, _, c_noise = (s[:, None] for s in edm_scalings(sigma))
    assert torch.equal(seen["c"], net.sigma_embed(fourier_features(c_noise[:, 0], cfg.freq_dim)))

    def ada(u):
        shift, scale = net.final_ada(seen["c"]).chunk(2, dim=1)
        return net.final_norm(u) * (1 + scale) + shift

    h = seen["h"]
    oracle = {
        "skip_then_norm": net.head(ada(c_out * h + c_skip * z)),
        "norm_then_skip": net.head(c_out * ada(h) + c_skip * z),
    }
    return logits, oracle, net


@pytest.mark.parametrize("readout", ["skip_then_norm", "norm_then_skip"])
def test_vit_readout_orders_match_their_formulas(readout):
    logits, oracle, _ = _logits_and_oracle(readout)
    torch.testing.assert_close(logits, oracle[readout], rtol=1e-5, atol=1e-5)
    other = next(k for k in oracle if k != readout)
    assert not torch.allclose(logits, oracle[other], atol=1e-3)


def test_the_readout_option_changes_no_parameter_and_the_default_is_ours():
    ours, official = (
        build_block(_run("vit", "digits", model={"readout": r}), model_plans(_run("vit", "digits"))["blocks"][0])
        for r in ("skip_then_norm", "norm_then_skip")
    )
    a, b = ours.state_dict(), official.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _run("vit", "digits").model.resolved().readout == "skip_then_norm"
    with pytest.raises(Exception, match="model.readout"):
        _run("vit", "digits", model={"readout": "sideways"}).model.resolved()
