"""The masked-diffusion family (MD4: Shi et al. 2024; design.md 1.5): loss, ancestral sampling, ELBO.

The level space is the masking time t (:class:`~dblocks.levels.TimeLevels`); a block's loss is
MD4's ELBO integrand at t drawn uniformly in its interval, and the end-to-end baseline is the same
objective over t in [0, 1]. The ELBO weight w(t) is part of the objective (not EDM's lambda(sigma)),
so the unweighted ablation does not apply. Sampling is MD4's ancestral sampler from t = 1 (all
masked) to t = 0 on a uniform grid; each step calls only the block owning its t (``BlockRouter``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch

from ..errors import ConfigError
from ..levels import TimeLevels
from ..masking import elbo_integrand, elbo_weight, get_schedule, mask_tokens
from ..models.mdm import MDM_SIZES, MDMBlock, MDMConfig, build_mdm
from ..noise import route
from ..plan import BlockSpec, plan_boundaries
from ..sampling import BlockRouter
from ..text import CHAMPION_MAX_BPC, TextSplit, text_split
from .base import Array, Family, Headline, Row, WeightedLoss, refuse_batch_mean


# ---- the loss (MD4 Eq. 5) -------------------------------------------------------------------------
def mdm_loss(net: MDMBlock, batch: tuple[torch.Tensor], t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample block loss at masking times t (N,): mask x = tokens[:, :seq_len] with probability
    1 - alpha(t) and score the masked tokens with the MD4 ELBO integrand."""
    (tokens,) = batch
    x = tokens[:, : net.cfg.seq_len]  # (N, T): the whole window, no next-token shift
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    z, masked = mask_tokens(x, t, u, net.cfg.schedule, net.mask_id)
    return elbo_integrand(net(z, t), x, masked, t, net.cfg.schedule)


mdm_baseline_loss = mdm_loss  # the end-to-end MD4 baseline: the same objective over t in [0, 1]


# ---- ancestral sampling (MD4 Sec. 4) ------------------------------------------------------------
def mdm_denoiser(net: MDMBlock):
    """The block's reverse step D(z, t, *, s, u, gumbel) -> z_s for the ancestral sampler.

    Unlike the sigma families' denoisers it returns tokens, not an expected embedding: each
    still-masked token is unmasked with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), to
    argmax(logits + gumbel) (a draw from softmax(logits)); unmasked tokens stay (carry-over).
    ``u`` (N, T) and ``gumbel`` (N, T, V) are drawn by the caller so draws never depend on routing.
    """
    net = net.eval()
    sched = get_schedule(net.cfg.schedule)

    def step(z: torch.Tensor, t: torch.Tensor, *, s: torch.Tensor, u: torch.Tensor, gumbel: torch.Tensor):
        m_t, m_s = sched.masked(t), sched.masked(s)  # 1 - alpha, float64
        p_unmask = ((m_t - m_s) / m_t)[:, None]  # = (alpha(s) - alpha(t)) / (1 - alpha(t)), exactly 1 at s=0
        draw = (net(z, t).float() + gumbel).argmax(-1)  # (N, T) in 0..V-1
        unmask = (z == net.mask_id) & (u < p_unmask)
        return torch.where(unmask, draw, z)

    return step


@torch.no_grad()
def sample_mdm(
    nets: Sequence[MDMBlock],
    plan: Sequence[BlockSpec],
    levels: TimeLevels,
    num: int,
    seq_len: int,
    *,
    steps: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Ancestral MD4 sampling through the chained blocks on ``levels.grid(steps)``: (num, seq_len) ids in 0..V-1."""
    cfg = nets[0].cfg
    device = next(nets[0].parameters()).device
    router = BlockRouter([mdm_denoiser(n) for n in nets], plan_boundaries(list(plan)))
    g = torch.Generator().manual_seed(seed)
    z = torch.full((num, seq_len), cfg.mask_id, dtype=torch.int64, device=device)
    grid = levels.grid(steps).tolist()
    for t, s in zip(grid[:-1], grid[1:]):
        u = torch.rand((num, seq_len), generator=g, dtype=torch.float64).to(device)
        e = torch.rand((num, seq_len, cfg.vocab_size), generator=g).clamp_min(1e-20)
        gumbel = -torch.log(-torch.log(e)).to(device)
        full = lambda v: torch.full((num,), v, dtype=torch.float64, device=device)  # noqa: E731
        z = router(z, full(t), s=full(s), u=u, gumbel=gumbel)
    return z


# ---- evaluation: the ELBO in bits per character ----------------------------------------------------
def routed_logits(nets: Sequence[MDMBlock], boundaries: list[float], z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits (N, T, V) with each sample's t sent to the block that owns it (route())."""
    owner = route(t, boundaries).to(z.device)
    out = torch.empty((*z.shape, nets[0].cfg.vocab_size), device=z.device)
    for b in owner.unique().tolist():
        idx = (owner == b).nonzero().squeeze(1)
        out[idx] = nets[b](z[idx], t[idx]).float()
    return out


@torch.no_grad()
def elbo_bpc(
    nets: Sequence[MDMBlock],
    plan: Sequence[BlockSpec],
    windows: torch.Tensor,
    *,
    seed: int = 0,
    t_samples: int = 16,
    batch_size: int = 512,
) -> float:
    """The MD4 ELBO in bits per character on ``windows`` (N, T+1): stratified Monte Carlo over t,
    t_k = (k + u)/K for k = 0..K-1 (one u per window and k), each t routed to its block. All draws
    come from ``seed`` in a fixed order, so every model compared sees the same t and masks."""
    cfg = nets[0].cfg
    device = next(nets[0].parameters()).device
    x = windows[:, : cfg.seq_len].to(device)  # (W, T)
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(t_samples, dtype=torch.float64)[:, None]
    t = (k + torch.rand((t_samples, len(x)), generator=g, dtype=torch.float64)) / t_samples  # (K, W)
    u = torch.rand((t_samples, *x.shape), generator=g, dtype=torch.float64)  # (K, W, T)
    t, u = t.flatten().to(device), u.flatten(0, 1)  # (K*W,), (K*W, T)
    xs = x.repeat(t_samples, 1)  # row k*W + w is window w
    bounds = plan_boundaries(list(plan))
    per = torch.empty(len(t), dtype=torch.float64, device=device)
    for i in range(0, len(t), batch_size):
        sl = slice(i, i + batch_size)
        z, masked = mask_tokens(xs[sl], t[sl], u[sl], cfg.schedule, cfg.mask_id)
        per[sl] = elbo_integrand(routed_logits(nets, bounds, z, t[sl]), xs[sl], masked, t[sl], cfg.schedule).double()
    return float(per.mean() / math.log(2))  # mean over t of the integrand = the ELBO (t ~ U[0, 1])


def evaluate_mdm(
    nets: Sequence[MDMBlock],
    plan: Sequence[BlockSpec],
    split: TextSplit,
    levels: TimeLevels,
    *,
    seed: int = 0,
    windows: int = 256,
    t_samples: int = 16,
    sample_chars: int = 256,
    steps: int = 64,
) -> dict:
    """``test_bpc``: the MD4 ELBO (bits/char) on the first ``windows`` test windows; ``sample_text``:
    ancestral samples (about ``sample_chars`` characters, one line per sampled window).

    The baseline (one net over t in [0, 1]) is evaluated the same way, with the same draws."""
    nets = [n.eval() for n in nets]
    bpc = elbo_bpc(nets, plan, split.test[:windows], seed=seed, t_samples=t_samples)
    seq_len = nets[0].cfg.seq_len
    num = max(1, math.ceil(sample_chars / seq_len))
    ids = sample_mdm(nets, plan, levels, num, seq_len, steps=steps, seed=seed)
    text = "\n".join(split.vocab.decode(row.tolist()) for row in ids.cpu())
    return {"test_bpc": bpc, "sample_text": text}


# ---- the family -----------------------------------------------------------------------------------
class MDM(Family):
    name = "mdm"
    data = "text"
    kind = "text"
    config = MDMConfig
    sizes = MDM_SIZES
    rows = (Row("test bits per character (ELBO)", "test_bpc", "{:.3f}"),)
    headline = Headline("test_bpc", higher_is_better=False, threshold=CHAMPION_MAX_BPC)

    def levels_of(self, cfg: MDMConfig, noise) -> TimeLevels:
        """Masking time t under the model's schedule (``model.schedule``); ``noise`` does not apply."""
        return TimeLevels(schedule=cfg.schedule)

    def check(self, run) -> None:
        refuse_batch_mean(run, "the mdm family's w(t) belongs to the ELBO (averaging it breaks the bound)")
        if not run.train.loss_weighting:
            raise ConfigError(
                "train.loss_weighting=false: the mdm family's ELBO weight is not an ablation; keep it true"
            )

    build = staticmethod(build_mdm)

    def loss(self, cfg: MDMConfig, levels: TimeLevels, *, baseline: bool, weighted: bool, **_) -> WeightedLoss:
        """MD4's ELBO integrand; w(t) belongs to the ELBO, so ``weighted`` and ``ce_weighting`` do
        not apply (``check``). Its weight is the ELBO's w(t)."""
        fn = mdm_baseline_loss if baseline else mdm_loss
        return WeightedLoss(fn, partial(elbo_weight, name=cfg.schedule))

    def denoiser(self, net: MDMBlock, levels: TimeLevels):
        return mdm_denoiser(net)

    def predict_arrays(self, cfg: MDMConfig) -> tuple[dict[str, Array], Array]:
        """The reverse step from t (``sigma``) to s < t: token ids in and out (``mdm_denoiser``)."""
        tokens = Array(torch.int64, (None, None), fill=cfg.mask_id)  # (N, T), all masked in the example
        return {
            "z": tokens,
            "sigma": Array(torch.float32, (None,), fill=0.5),  # t
            "s": Array(torch.float32, (None,), fill=0.25),
            "u": Array(torch.float32, (None, None), fill=0.5),  # (N, T) uniform draws
            "gumbel": Array(torch.float32, (None, None, cfg.vocab_size)),  # (N, T, V) Gumbel noise
        }, tokens

    def evaluate(self, nets, plan, run, data, *, baseline: bool) -> dict:
        split = text_split(data, run.model.resolved().seq_len)
        return evaluate_mdm(list(nets), plan, split, run.levels, seed=run.seed)
