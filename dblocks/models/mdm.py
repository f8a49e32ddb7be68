"""Masked-diffusion character LM (MD4: Shi et al. 2024) cut into DiffusionBlocks blocks (design.md 1.5).

The noise level is the masking time t in [0, 1]. Forward process: each token of the clean
sequence x (T characters) is independently replaced by the mask token with probability
1 - alpha(t); alpha(0) = 1 (clean), alpha(1) = 0 (all masked). A block predicts logits over the
84 real characters at every position (never the mask); MD4's carry-over ("SUBS") keeps every
unmasked token as it is, so only masked positions are predicted and scored:

    z        = mask(x, t)                                 P(z_i = [M]) = 1 - alpha(t)
    logits   = head(adaLN(L/B adaLN-Zero layers(embed(z) + pos | t emb)))      (N, T, V)
    loss(t)  = w(t) * sum_{i masked} CE(logits_i, x_i) / T,   w(t) = -alpha'(t) / (1 - alpha(t))
    ELBO     = int_0^1 E[loss(t)] dt   (nats per character; MD4 Eq. 5, continuous time)

Blocks partition alpha by equal decrements: alpha(t_b) = 1 - b/B (linear alpha gives t_b = b/B).
Block 0 owns the noisiest interval (t near 1) and block B-1 the cleanest, as with sigma. Each
block owns its token and position embeddings, t embedder, layers, final adaLN and head; the
target space is the token ids themselves, so no shared table is needed. With one block of all
L layers trained on t in [0, 1] the same class is the end-to-end MD4 baseline.

Sampling is MD4's ancestral sampler from t = 1 (all masked) to t = 0 on a uniform grid; each
step calls only the block owning its t (``BlockRouter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..noise import route
from ..plan import BlockSpec, plan_boundaries
from ..sampling import BlockRouter
from ..text import VOCAB_SIZE, TextSplit, decode
from .dit import fourier_features
from .layers import DiTLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized

SCHEDULES = ("linear", "cosine")
T_MIN_WEIGHT = 1e-4  # t is clamped below at this value for the ELBO weight (w = 1/t for linear)


# ---- masking schedules (MD4 Sec. 2, Table 4) ---------------------------------------------------
def alpha_linear(t: torch.Tensor) -> torch.Tensor:
    """MD4's linear schedule alpha(t) = 1 - t: the probability a token is still unmasked at t."""
    return 1.0 - t


def dalpha_linear(t: torch.Tensor) -> torch.Tensor:
    """alpha'(t) = -1 for the linear schedule."""
    return torch.full_like(t, -1.0)


def masked_linear(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha(t) = t, the masking probability (exact at both ends)."""
    return t


def time_linear(m: torch.Tensor) -> torch.Tensor:
    """The t at which the masking probability 1 - alpha(t) equals m: t = m."""
    return m


def alpha_cosine(t: torch.Tensor) -> torch.Tensor:
    """MD4's cosine schedule alpha(t) = 1 - cos(pi/2 (1 - t)) = 1 - sin(pi t / 2)."""
    return 1.0 - masked_cosine(t)


def dalpha_cosine(t: torch.Tensor) -> torch.Tensor:
    """alpha'(t) = -(pi/2) sin(pi/2 (1 - t)) = -(pi/2) cos(pi t / 2)."""
    return -(math.pi / 2) * torch.cos(math.pi / 2 * t)


def masked_cosine(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha(t) = cos(pi/2 (1 - t)), written as sin(pi t / 2) so it is exactly 0 at t=0, 1 at t=1."""
    return torch.sin(math.pi / 2 * t)


def time_cosine(m: torch.Tensor) -> torch.Tensor:
    """The t with 1 - alpha(t) = m: t = (2/pi) arcsin(m) = 1 - (2/pi) arccos(m)."""
    return (2 / math.pi) * torch.asin(m)


@dataclass(frozen=True)
class Schedule:
    """A masking schedule: alpha, its derivative, 1 - alpha (computed directly) and its inverse."""

    alpha: Callable[[torch.Tensor], torch.Tensor]
    dalpha: Callable[[torch.Tensor], torch.Tensor]
    masked: Callable[[torch.Tensor], torch.Tensor]
    time_of: Callable[[torch.Tensor], torch.Tensor]


_SCHEDULES = {
    "linear": Schedule(alpha_linear, dalpha_linear, masked_linear, time_linear),
    "cosine": Schedule(alpha_cosine, dalpha_cosine, masked_cosine, time_cosine),
}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (``model.schedule``)."""
    if name not in _SCHEDULES:
        raise ValueError(f"model.schedule={name!r}: choose one of {', '.join(SCHEDULES)}")
    return _SCHEDULES[name]


def elbo_weight(t: torch.Tensor, name: str = "linear") -> torch.Tensor:
    """MD4's continuous-time ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (1/t for linear),
    with t clamped below at 1e-4 (float64)."""
    s = get_schedule(name)
    t = torch.as_tensor(t, dtype=torch.float64).clamp_min(T_MIN_WEIGHT)
    return -s.dalpha(t) / s.masked(t)


def partition_times(num_blocks: int, schedule: str = "linear") -> list[float]:
    """B+1 ascending t boundaries with equal alpha decrements, alpha(t_b) = 1 - b/B (design.md 1.5).

    t_b = alpha^-1(1 - b/B): linear t_b = b/B; cosine t_b = 1 - (2/pi) arccos(b/B).
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"blocks.num={num_blocks}: must be an integer >= 1")
    s = get_schedule(schedule)
    inner = [float(s.time_of(torch.tensor(b / num_blocks, dtype=torch.float64))) for b in range(1, num_blocks)]
    return [0.0, *inner, 1.0]


# ---- config -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MDMConfig:
    vocab_size: int = VOCAB_SIZE  # real characters; the mask token is id vocab_size
    seq_len: int = 64
    width: int = 64
    heads: int = 4
    layers: int = 6  # total depth L; a block holds layers // B of them
    mlp_ratio: float = 4.0
    freq_dim: int = 64  # sinusoidal features of t fed to the t embedder
    schedule: str = "linear"  # alpha(t): linear | cosine

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"model.layers={self.layers}: must be >= 1")
        if self.seq_len < 1:
            raise ValueError(f"model.seq_len={self.seq_len}: must be >= 1")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"model.heads={self.heads}: must divide model.width={self.width}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}: must be > 0")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim}: must be an even number >= 2")
        if self.vocab_size < 2:
            raise ValueError(f"model.vocab_size={self.vocab_size}: must be >= 2")
        get_schedule(self.schedule)  # validates the name

    @property
    def mask_id(self) -> int:
        return self.vocab_size


MDM_SIZES: dict[str, MDMConfig] = {
    "debug": MDMConfig(width=32, heads=2, layers=6, seq_len=32, freq_dim=32),
    "tiny": MDMConfig(width=64, heads=4, layers=6, seq_len=64),
}


def mdm_config(size: str, **overrides) -> MDMConfig:
    """The registered size, with non-None overrides (e.g. ``schedule="cosine"``)."""
    return sized(MDM_SIZES, size, "mdm", **overrides)


# ---- network ------------------------------------------------------------------------------------
class MDMBlock(nn.Module):
    """One block: (z (N, T) ids with masks, t (N,)) -> logits over the real tokens (N, T, V)."""

    def __init__(self, cfg: MDMConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size + 1, d)  # + the mask token
        self.pos_embed = nn.Embedding(cfg.seq_len, d)
        self.t_embed = embedder(cfg.freq_dim, d)
        self.layers = nn.ModuleList(DiTLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, cfg.vocab_size)  # never predicts the mask
        self._init_weights()

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id

    def _init_weights(self) -> None:
        xavier_init(self)
        normal_init(self.token_embed.weight, self.pos_embed.weight, self.t_embed[0].weight, self.t_embed[2].weight)
        # adaLN-Zero: residual branches and the head start at zero, so logits start uniform.
        zero_init(*(layer.ada[1] for layer in self.layers), self.final_ada[1], self.head)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, length = z.shape  # (N, T)
        if length > self.cfg.seq_len:
            raise ValueError(f"a sequence of {length} tokens is longer than model.seq_len={self.cfg.seq_len}")
        pos = torch.arange(length, device=z.device)
        h = self.token_embed(z) + self.pos_embed(pos)  # (N, T, D)
        # fourier_features scales its input by 250; 4t gives DiT's timestep scale 1000 t.
        c = self.t_embed(fourier_features(4.0 * t, self.cfg.freq_dim))  # (N, D)
        for layer in self.layers:
            h = layer(h, c)
        return self.head(final_adaln(self.final_norm, self.final_ada, h, c))  # (N, T, V)


def build_mdm(cfg: MDMConfig, spec: BlockSpec, *, baseline: bool = False, seed: int = 0) -> MDMBlock:
    """A block of ``spec.num_layers`` layers; the baseline (end-to-end MD4) is the same class with all
    L layers trained on t in [0, 1]. ``seed`` is unused: the target space is the token ids."""
    return MDMBlock(cfg, spec.num_layers)


# ---- forward process and loss -------------------------------------------------------------------
def mask_tokens(
    x: torch.Tensor, t: torch.Tensor, uniforms: torch.Tensor, schedule_name: str, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MD4 forward process: z_i = [M] where u_i < 1 - alpha(t), else x_i. Returns (z, masked).

    ``uniforms`` are (N, T) draws of U[0, 1) (float64), so t = 0 masks nothing and t = 1 everything.
    """
    p = get_schedule(schedule_name).masked(t.to(torch.float64))[:, None]  # (N, 1)
    masked = uniforms.to(p.device) < p  # (N, T)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def elbo_integrand(
    logits: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, schedule_name: str
) -> torch.Tensor:
    """w(t) * sum_{i masked} CE(logits_i, x_i) / T per sample, (N,) (MD4 Eq. 5 integrand, nats/char).

    Carry-over (SUBS): unmasked positions are the token itself and contribute nothing.
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").reshape(x.shape)
    per = torch.where(masked, ce, torch.zeros_like(ce)).sum(1) / x.shape[1]
    return elbo_weight(t, schedule_name).to(per.device, per.dtype) * per


def mdm_loss(
    net: MDMBlock,
    batch: tuple[torch.Tensor],
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Per-sample block loss at masking times ``sigma`` = t (N,): mask x = tokens[:, :seq_len] with
    probability 1 - alpha(t) and score the masked tokens with the MD4 ELBO integrand. (sigma_data unused.)"""
    (tokens,) = batch
    x = tokens[:, : net.cfg.seq_len]  # (N, T): the whole window, no next-token shift
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    z, masked = mask_tokens(x, sigma, u, net.cfg.schedule, net.mask_id)
    return elbo_integrand(net(z, sigma), x, masked, sigma, net.cfg.schedule)


mdm_baseline_loss = mdm_loss  # the end-to-end MD4 baseline: the same objective over t in [0, 1]


# ---- ancestral sampling (MD4 Sec. 4) ------------------------------------------------------------
def mdm_denoiser(net: MDMBlock, sigma_data: float = 0.5):
    """The block's reverse step D(z, t, *, s, u, gumbel) -> z_s for the ancestral sampler.

    Each still-masked token is unmasked with probability (alpha(s) - alpha(t)) / (1 - alpha(t)),
    to argmax(logits + gumbel) (a draw from softmax(logits)); unmasked tokens stay (carry-over).
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


def sample_times(steps: int) -> torch.Tensor:
    """The uniform grid t_j = 1 - j/steps, j = 0..steps (float64), from all-masked to clean."""
    if steps < 1:
        raise ValueError(f"sample.steps={steps}: must be >= 1")
    return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps


@torch.no_grad()
def sample_mdm(
    nets: Sequence[MDMBlock], plan: Sequence[BlockSpec], num: int, seq_len: int, *, steps: int = 64, seed: int = 0
) -> torch.Tensor:
    """Ancestral MD4 sampling through the chained blocks: (num, seq_len) token ids in 0..V-1."""
    cfg = nets[0].cfg
    device = next(nets[0].parameters()).device
    router = BlockRouter([mdm_denoiser(n) for n in nets], plan_boundaries(list(plan)))
    g = torch.Generator().manual_seed(seed)
    z = torch.full((num, seq_len), cfg.mask_id, dtype=torch.int64, device=device)
    grid = sample_times(steps).tolist()
    for t, s in zip(grid[:-1], grid[1:]):
        u = torch.rand((num, seq_len), generator=g, dtype=torch.float64).to(device)
        e = torch.rand((num, seq_len, cfg.vocab_size), generator=g).clamp_min(1e-20)
        gumbel = -torch.log(-torch.log(e)).to(device)
        full = lambda v: torch.full((num,), v, dtype=torch.float64, device=device)  # noqa: E731
        z = router(z, full(t), s=full(s), u=u, gumbel=gumbel)
    return z


# ---- evaluation ---------------------------------------------------------------------------------
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
    *,
    baseline: bool,
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
    ids = sample_mdm(nets, plan, max(1, math.ceil(sample_chars / seq_len)), seq_len, steps=steps, seed=seed)
    text = "\n".join(decode(row.tolist()) for row in ids.cpu())
    return {"test_bpc": bpc, "sample_text": text}
