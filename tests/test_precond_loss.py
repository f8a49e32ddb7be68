"""EDM preconditioning (design.md 1.1) and the per-sample weighted losses (paper Eq. 6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dblocks import denoise, edm_readout, edm_scalings, loss_weight, weighted_ce, weighted_l2
from helpers import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

SD = SIGMA_DATA


def _sigma_grid() -> torch.Tensor:
    # 0.002 and 80 exactly, plus a log-spaced grid and a few round values.
    g = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 41, dtype=torch.float64)
    extra = torch.tensor([SIGMA_MIN, 0.1796, 0.3012, 0.5, 0.5050, 1.0, SIGMA_MAX], dtype=torch.float64)
    return torch.cat([g, extra])


# ---- 5. EDM identities -----------------------------------------------------------------------
def test_edm_scalings_closed_forms_float64():
    s = _sigma_grid()
    c_skip, c_out, c_in, c_noise = edm_scalings(s, SD)
    for t in (c_skip, c_out, c_in, c_noise):
        assert t.dtype == torch.float64 and t.shape == s.shape
    for i, v in enumerate(s.tolist()):
        assert c_skip[i].item() == pytest.approx(SD**2 / (v**2 + SD**2), rel=1e-14)
        assert c_out[i].item() == pytest.approx(v * SD / math.sqrt(v**2 + SD**2), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(v**2 + SD**2), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(math.log(v) / 4, rel=1e-14, abs=1e-15)


def test_edm_identities_float64():
    s = _sigma_grid()
    c_skip, c_out, c_in, c_noise = edm_scalings(s, SD)
    w = loss_weight(s, SD)
    one = torch.ones_like(s)
    torch.testing.assert_close(w * c_out**2, one, rtol=1e-13, atol=0)  # design.md: w c_out^2 = 1
    torch.testing.assert_close(c_in**2 * (s**2 + SD**2), one, rtol=1e-13, atol=0)
    torch.testing.assert_close(c_skip + c_out**2 / SD**2, one, rtol=1e-13, atol=0)
    torch.testing.assert_close(c_out, s * c_in * SD, rtol=1e-13, atol=0)
    # The F-space target (y - c_skip z)/c_out has unit variance when Var y = sd^2 (EDM App. B.6):
    # c_skip^2 sigma^2 + (1-c_skip)^2 sd^2 = c_out^2.
    torch.testing.assert_close(c_skip**2 * s**2 + (1 - c_skip) ** 2 * SD**2, c_out**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.exp(4 * c_noise), s, rtol=1e-13, atol=0)


def test_loss_weight_values():
    s = _sigma_grid()
    exp = (s**2 + SD**2) / (s * SD) ** 2
    torch.testing.assert_close(loss_weight(s, SD), exp, rtol=1e-14, atol=0)
    # design.md: "w is ~2.5e5 at sigma_min": (0.002^2 + 0.25) / (0.001)^2 = 250004.
    assert loss_weight(torch.tensor(SIGMA_MIN, dtype=torch.float64)).item() == pytest.approx(250004.0, rel=1e-12)
    assert loss_weight(torch.tensor(SIGMA_MAX, dtype=torch.float64)).item() == pytest.approx(
        (6400 + 0.25) / 1600, rel=1e-12
    )


def test_default_sigma_data_is_half():
    s = _sigma_grid()
    for a, b in zip(edm_scalings(s), edm_scalings(s, 0.5)):
        assert torch.equal(a, b)
    assert torch.equal(loss_weight(s), loss_weight(s, 0.5))


# ---- denoise = c_skip z + c_out F(c_in z, c_noise, cond) --------------------------------------
def test_denoise_composes_preconditioning_and_passes_condition_unscaled():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)  # a conditioning input
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    seen = {}

    def net(x_in, c_noise, cond):
        seen.update(x_in=x_in, c_noise=c_noise, cond=cond)
        return 2.0 * x_in + c_noise[:, None, None] + cond  # an arbitrary known F

    out = denoise(net, z, sigma, x)
    v = sigma[:, None, None]
    c_in = 1 / torch.sqrt(v**2 + SD**2)
    torch.testing.assert_close(seen["x_in"], c_in * z, rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4, rtol=1e-14, atol=0)
    assert seen["cond"] is x  # c_in applies to the noisy target only, never to the condition
    f = 2.0 * c_in * z + (sigma.log() / 4)[:, None, None] + x
    exp = SD**2 / (v**2 + SD**2) * z + v * SD / torch.sqrt(v**2 + SD**2) * f
    torch.testing.assert_close(out, exp, rtol=1e-13, atol=1e-13)


def test_weighted_l2_of_denoise_equals_unweighted_f_space_error():
    """w ||D - y||^2 = ||F - F_target||^2 with F_target = (y - c_skip z)/c_out (because w c_out^2 = 1)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) * SD
    sigma = torch.tensor([0.002, 0.01, 0.2, 0.5, 5.0, 80.0], dtype=torch.float64)
    z = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=g, dtype=torch.float64)
    f = torch.randn(y.shape, generator=g, dtype=torch.float64)
    d = denoise(lambda x_in, c_noise: f, z, sigma)
    v = sigma[:, None, None, None]
    c_skip, c_out = SD**2 / (v**2 + SD**2), v * SD / torch.sqrt(v**2 + SD**2)
    f_target = (y - c_skip * z) / c_out
    torch.testing.assert_close(weighted_l2(d, y, sigma), (f - f_target).square().mean((1, 2, 3)), rtol=1e-9, atol=0)


# ---- 13. loss variants ------------------------------------------------------------------------
def test_weighted_l2_is_weight_times_per_sample_mse():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(4, 3, 5, 5, generator=g)
    y = torch.randn(4, 3, 5, 5, generator=g)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0])
    out = weighted_l2(d, y, sigma)
    assert out.shape == (4,)
    for i in range(4):
        s = sigma[i].double().item()
        w = (s**2 + SD**2) / (s * SD) ** 2
        mse = ((d[i].double() - y[i].double()) ** 2).mean().item()
        assert out[i].item() == pytest.approx(w * mse, rel=1e-5)
    # Zero error gives zero loss; the loss is not reduced over the batch.
    assert torch.equal(weighted_l2(y, y, sigma), torch.zeros(4))


def test_weighted_ce_is_weight_times_per_sample_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 10, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 3, 7])
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    out = weighted_ce(logits, labels, sigma)
    assert out.shape == (5,)
    w = (sigma**2 + SD**2) / (sigma * SD) ** 2
    ce = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(out, w * ce, rtol=1e-13, atol=0)
    # And the cross-entropy itself by hand: logsumexp - logit of the label.
    by_hand = logits.logsumexp(1) - logits[torch.arange(5), labels]
    torch.testing.assert_close(out, w * by_hand, rtol=1e-12, atol=0)


def test_weighted_ce_token_sequences_average_tokens_per_sample():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)  # (N, T, K)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    sigma = torch.tensor([0.01, 0.5, 40.0], dtype=torch.float64)
    out = weighted_ce(logits, labels, sigma)
    assert out.shape == (3,)
    for i in range(3):
        s = sigma[i].item()
        w = (s**2 + SD**2) / (s * SD) ** 2
        ce = F.cross_entropy(logits[i], labels[i], reduction="mean").item()
        assert out[i].item() == pytest.approx(w * ce, rel=1e-12)


@pytest.mark.parametrize("shape", [(6, 16), (6, 5, 16)])
def test_edm_readout_is_c_out_h_plus_c_skip_z_per_sample(shape):
    """The discrete-target recombination before the classifier (EDM Table 1): per-sample scalars
    broadcast over every trailing axis, in z's dtype."""
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([SIGMA_MIN, 0.05, 0.3, 0.5, 4.0, SIGMA_MAX], dtype=torch.float64)
    h, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = edm_readout(h, z, sigma, SD)
    assert out.shape == shape and out.dtype == torch.float32
    s = sigma.reshape(-1, *([1] * (len(shape) - 1)))
    expected = s * SD / (s**2 + SD**2).sqrt() * h.double() + SD**2 / (s**2 + SD**2) * z.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
