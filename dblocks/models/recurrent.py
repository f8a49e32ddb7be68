"""Recurrent-depth character LM (Geiping et al. 2025) as ONE DiffusionBlocks block (design.md 1.5).

Geiping et al. split a causal LM into a prelude P, a recurrent core R and a coda C:
``e = P(x)``, ``s_0 ~ N(0, init_std^2 I)``, ``s_k = R(e, s_{k-1})`` for k = 1..K, ``logits = C(s_K)``,
trained with truncated backprop through time (only the last ``bptt`` iterations carry gradient).
That is the end-to-end baseline here (:class:`RecurrentBaseline`, :func:`recurrent_baseline_loss`).

DiffusionBlocks replaces the recurrence by denoising (:class:`RecurrentBlock`): the core is one
sigma-conditioned denoiser of the NEXT token's fixed embedding, trained in a single pass at a random
sigma from the whole truncated log-normal (Eq. 6; no unrolling, no backprop through time):

    z_i = E[y_i] + sigma eps_i                            (y_i = x_{i+1}, E the fixed table)
    h   = core(e + c_in z, c(sigma))                      (c = the block's own sigma embedder)
    logits = coda(c_out h + c_skip z, c(sigma))           loss = w(sigma) CE(logits, y)

Inference keeps the K-iteration loop as K Euler steps on the CDF grid (:func:`predict_recurrent`):
the prelude runs once, each step calls core + coda once, D = softmax(logits) @ E.

What position i sees (every attention is causal): the clean tokens x_0..x_i (through e), and
z_0..z_i. z_i is the noisy target itself; z_j (j < i) is a noisy copy of y_j = x_{j+1}, a clean
token <= i that position i already sees, so nothing of x_{>i} or z_{>i} reaches position i.
At inference z_j is the sampler's state at position j, itself a function of x_<=j and the noise.
The family always runs as one block (B = 1): its one plan entry covers [sigma_min, sigma_max].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..embedding import expected_embedding, fixed_embedding
from ..loss import weighted_ce
from ..noise import P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN, inference_sigmas
from ..plan import BlockSpec
from ..precond import SIGMA_DATA, edm_scalings
from ..sampling import sample_euler
from ..text import VOCAB_SIZE, TextSplit, decode, encode
from .dit import fourier_features
from .layers import DiTLayer, PreLNLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized


@dataclass(frozen=True)
class RecurrentConfig:
    vocab_size: int = VOCAB_SIZE
    seq_len: int = 64
    width: int = 64
    heads: int = 4
    prelude: int = 1  # layers of the prelude P (runs once per sequence)
    core: int = 2  # layers of the recurrent core R (the denoiser; K calls at inference)
    coda: int = 1  # layers of the coda C (after every core call)
    iterations: int = 8  # K: core iterations at inference, and the baseline's unrolled depth
    bptt: int = 2  # the baseline backpropagates through the last ``bptt`` iterations only
    mlp_ratio: float = 4.0
    freq_dim: int = 64  # sinusoidal features of c_noise fed to the sigma embedder
    init_std: float = 1.0  # the baseline's random initial state s_0 ~ N(0, init_std^2 I)

    @property
    def layers(self) -> int:
        """Total depth L = prelude + core + coda (one block holds all of them)."""
        return self.prelude + self.core + self.coda

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"model.heads={self.heads}: must divide model.width={self.width}")
        if self.seq_len < 1:
            raise ValueError(f"model.seq_len={self.seq_len}: must be >= 1")
        if self.core < 1:
            raise ValueError(f"model.core={self.core}: the recurrent core needs >= 1 layer")
        for key in ("prelude", "coda"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be >= 0")
        if self.iterations < 2:
            raise ValueError(f"model.iterations={self.iterations}: need >= 2 (K Euler grid points)")
        if not 1 <= self.bptt <= self.iterations:
            raise ValueError(f"model.bptt={self.bptt}: must be in 1..model.iterations={self.iterations}")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim}: must be even and >= 2")
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std}: must be > 0")


RECURRENT_SIZES: dict[str, RecurrentConfig] = {
    "debug": RecurrentConfig(width=32, heads=2, seq_len=32, iterations=4, freq_dim=32),
    "tiny": RecurrentConfig(width=64, heads=4, seq_len=64, iterations=8),
}


def recurrent_config(size: str, **overrides) -> RecurrentConfig:
    """The registered size, with non-None overrides (e.g. ``iterations=16``)."""
    return sized(RECURRENT_SIZES, size, "recurrent", **overrides)


# ---- layers -------------------------------------------------------------------------------------
class Prelude(nn.Module):
    """P: own token + position embeddings, plain pre-LN causal layers (nanoGPT's Block), a final
    LayerNorm -> context e (N, T, D)."""

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        self.layers = nn.ModuleList(
            PreLNLayer(cfg.width, cfg.heads, cfg.mlp_ratio, causal=True) for _ in range(cfg.prelude)
        )
        self.norm = nn.LayerNorm(cfg.width)  # e at unit scale, comparable to c_in z and to the state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.token_embed(x) + self.pos_embed[: x.shape[1]]  # (N, T, D)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class Core(nn.Module):
    """R: ``core`` DiT adaLN-Zero layers conditioned on c (N, D), with causal attention
    (one call = one iteration / one denoiser evaluation)."""

    def __init__(self, cfg: RecurrentConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DiTLayer(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, c, causal=True)
        return h


class Coda(nn.Module):
    """C: ``coda`` conditioned causal layers, final adaLN norm, linear head -> logits (N, T, V)."""

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.stack = Core(cfg, cfg.coda)
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.head = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.head(final_adaln(self.norm, self.ada, self.stack(h, c), c))


class RecurrentLM(nn.Module):
    """Prelude / core / coda, a sigma embedder, and the fixed target table (a persistent buffer).

    Both models below have exactly these parameters, so their sizes compare one to one.
    """

    def __init__(self, cfg: RecurrentConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.prelude = Prelude(cfg)
        self.sigma_embed = embedder(cfg.freq_dim, d)
        self.core = Core(cfg, cfg.core)
        self.coda = Coda(cfg)
        # The target space of every block (design.md 2.1): seeded by the RUN seed, never trained.
        self.register_buffer("targets", fixed_embedding(cfg.vocab_size, d, seed))
        self._init_weights()

    def _init_weights(self) -> None:
        xavier_init(self)
        p, e = self.prelude, self.sigma_embed
        normal_init(p.token_embed.weight, p.pos_embed, e[0].weight, e[2].weight)
        # adaLN-Zero: every conditioned residual branch and the head start at zero.
        ada = (layer.ada[1] for layer in [*self.core.layers, *self.coda.stack.layers])
        zero_init(*ada, self.coda.ada[1], self.coda.head)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """e = P(x): (N, T) token ids -> (N, T, D); computed once per sequence."""
        return self.prelude(x)

    def condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The sigma embedding c (N, D) of c_noise = ln(sigma)/4 (DiT's timestep embedder)."""
        return self.sigma_embed(fourier_features(c_noise, self.cfg.freq_dim))


class RecurrentBlock(RecurrentLM):
    """The DiffusionBlocks model: the core is one sigma-conditioned denoiser (design.md 1.5)."""

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, sigma_data: float = SIGMA_DATA):
        """logits = coda(c_out h + c_skip z), h = core(e + c_in z | c(sigma)) (EDM Table 1; c_in on z only).

        z (N, T, D) noisy next-token embeddings, sigma (N,), context e (N, T, D) -> (N, T, V).
        """
        c_skip, c_out, c_in, c_noise = (s.to(z.dtype).reshape(-1, 1, 1) for s in edm_scalings(sigma, sigma_data))
        c = self.condition(c_noise.flatten())  # (N, D)
        h = self.core(context + c_in * z, c)
        return self.coda(c_out * h + c_skip * z, c)


class RecurrentBaseline(RecurrentLM):
    """Geiping et al.'s recurrent-depth LM: s_k = norm(core(s_{k-1} + e)), logits = coda(s_K).

    No sigma: core and coda see a constant, iteration-free condition (the sigma embedder at
    c_noise = 0), so the baseline has exactly the parameters of :class:`RecurrentBlock`.
    """

    def constant_condition(self, n: int, device) -> torch.Tensor:
        return self.condition(torch.zeros(n, device=device))

    def step(self, s: torch.Tensor, context: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One iteration s_k = norm(R(s_{k-1} + e)) (sum adapter; the state normalised as Geiping et al.)."""
        return F.layer_norm(self.core(s + context, c), s.shape[-1:], eps=1e-6)

    def forward(self, context: torch.Tensor, s0: torch.Tensor, iterations: int, bptt: int | None = None):
        """logits = C(s_K) after K = ``iterations`` steps from s0; truncated BPTT: the first K - bptt
        steps run under no_grad, so gradients flow through the last ``bptt`` steps only."""
        bptt = iterations if bptt is None else min(bptt, iterations)
        c = self.constant_condition(s0.shape[0], s0.device)
        s = s0
        with torch.no_grad():
            for _ in range(iterations - bptt):
                s = self.step(s, context, c)
        for _ in range(bptt):
            s = self.step(s, context, c)
        return self.coda(s, c)


def build_recurrent(cfg: RecurrentConfig, spec: BlockSpec, *, baseline: bool = False, seed: int = 0) -> RecurrentLM:
    """The one block (B = 1, all L = prelude + core + coda layers), or the truncated-BPTT baseline."""
    if spec.num_blocks != 1:
        raise ValueError(
            f"blocks.num={spec.num_blocks}: the recurrent family trains its core as one block; use blocks.num=1"
        )
    if spec.num_layers != cfg.layers:
        raise ValueError(f"block of {spec.num_layers} layers, but model.prelude+core+coda = {cfg.layers}")
    return (RecurrentBaseline if baseline else RecurrentBlock)(cfg, seed)


# ---- losses -------------------------------------------------------------------------------------
def recurrent_loss(
    net: RecurrentBlock,
    batch: tuple[torch.Tensor],
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Per-sample Eq. 6 in ONE pass: z = E[y] + sigma eps, loss = w(sigma) mean_i CE(logits_i, y_i)."""
    (tokens,) = batch
    x, y = tokens[:, :-1], tokens[:, 1:]  # (N, T)
    eps = torch.randn((*y.shape, net.cfg.width), generator=generator).to(tokens.device)
    z = net.targets[y] + sigma.to(eps.dtype).reshape(-1, 1, 1) * eps  # (N, T, D)
    logits = net(z, sigma, net.context(x), sigma_data=sigma_data)
    return weighted_ce(logits, y, sigma, sigma_data)


def recurrent_baseline_loss(
    net: RecurrentBaseline,
    batch: tuple[torch.Tensor],
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Per-sample next-character CE after K iterations from s_0 ~ N(0, init_std^2 I), truncated BPTT."""
    (tokens,) = batch
    x, y = tokens[:, :-1], tokens[:, 1:]
    cfg = net.cfg
    s0 = cfg.init_std * torch.randn((*x.shape, cfg.width), generator=generator).to(tokens.device)
    logits = net(net.context(x), s0, cfg.iterations, cfg.bptt)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").reshape(y.shape).mean(1)


# ---- inference ----------------------------------------------------------------------------------
class RecurrentDenoiser:
    """D(z, sigma, context) = softmax(logits) @ E (design.md 1.4, discrete targets).

    ``context`` is the prelude's output, computed once per sequence and passed to every call;
    ``logits`` holds the last call's logits (the prediction after the final call), ``calls`` counts.
    """

    def __init__(self, net: RecurrentBlock, sigma_data: float = SIGMA_DATA):
        self.net, self.sigma_data = net, sigma_data
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.logits = self.net(z, sigma, context, sigma_data=self.sigma_data)
        self.calls += 1
        return expected_embedding(self.logits, self.net.targets).to(z.dtype)


def recurrent_denoiser(net: RecurrentBlock, sigma_data: float = SIGMA_DATA) -> RecurrentDenoiser:
    """The block as a denoiser callable D(z, sigma, context=e) for :func:`dblocks.sampling.sample_euler`."""
    return RecurrentDenoiser(net, sigma_data)


@torch.no_grad()
def predict_recurrent(
    net: RecurrentLM,
    x: torch.Tensor,
    *,
    iterations: int | None = None,
    seed: int = 0,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Next-character logits (N, T, V) for x (N, T) after K = ``iterations`` core calls (cfg default).

    The prelude runs once. DiffusionBlocks: K Euler steps on the CDF grid inference_sigmas(K) from
    z = sigma_max N(0, I), one core + coda call each; the final call's logits are the prediction.
    Baseline: K recurrent iterations from s_0 ~ N(0, init_std^2 I). Noise from a generator seeded ``seed``.
    """
    k = iterations or net.cfg.iterations
    g = torch.Generator().manual_seed(seed)
    e = net.context(x)  # (N, T, D), once
    if isinstance(net, RecurrentBaseline):
        s0 = net.cfg.init_std * torch.randn(e.shape, generator=g).to(e.device)
        return net(e, s0, k)
    grid = inference_sigmas(k, sigma_min=sigma_min, sigma_max=sigma_max, p_mean=p_mean, p_std=p_std)
    denoiser = recurrent_denoiser(net, sigma_data)
    z = sigma_max * torch.randn(e.shape, generator=g).to(e.device)
    sample_euler(denoiser, z, grid, extra_args={"context": e})
    return denoiser.logits


@torch.no_grad()
def first_call_logits(
    net: RecurrentBlock, x: torch.Tensor, *, seed: int = 0, sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """The logits of the sampler's first call (sigma_max, the same seeded z as :func:`predict_recurrent`).

    At sigma_max, z carries almost no signal, so these are the core's predictive distribution
    p(y_i | x_<=i): a calibrated one-call CE, unlike the final call's logits, which concentrate on
    the token the sampler committed to."""
    e = net.context(x)
    z = sigma_max * torch.randn(e.shape, generator=torch.Generator().manual_seed(seed)).to(e.device)
    return net(z, torch.full((x.shape[0],), sigma_max, dtype=torch.float64, device=e.device), e, sigma_data=sigma_data)


@torch.no_grad()
def generate_recurrent(net: RecurrentLM, prompt: torch.Tensor, num_chars: int, **predict) -> torch.Tensor:
    """Greedy generation: append argmax of the last position's prediction, ``num_chars`` times
    (the context is the last seq_len characters). Returns the prompt and continuation ids."""
    ids = prompt.to(net.targets.device)
    for _ in range(num_chars):
        logits = predict_recurrent(net, ids[-net.cfg.seq_len :][None], **predict)
        ids = torch.cat([ids, logits[0, -1].argmax()[None]])
    return ids


def evaluate_recurrent(
    nets: list[nn.Module],
    plan: list[BlockSpec],
    split: TextSplit,
    *,
    baseline: bool,
    seed: int = 0,
    windows: int = 256,
    iterations: int | None = None,
    prompt: str = "ROMEO:\n",
    sample_chars: int = 200,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float = SIGMA_DATA,
) -> dict:
    """Teacher-forced next-character CE (nats/char), bits/char and accuracy of the prediction after
    K iterations on the first ``windows`` validation windows, plus a greedy sample from ``prompt``.

    ``nets`` = [the one net], ``plan`` = its one BlockSpec (its range gives sigma_min/sigma_max).
    """
    if len(nets) != 1 or len(plan) != 1:
        raise ValueError(f"blocks.num={len(plan)}: the recurrent family runs as one block; use blocks.num=1")
    net = nets[0].eval()
    if baseline != isinstance(net, RecurrentBaseline):
        raise ValueError(f"baseline={baseline}, but the net is a {type(net).__name__}")
    device = net.targets.device
    opts = dict(iterations=iterations, seed=seed, sigma_min=plan[0].lo, sigma_max=plan[0].hi,
                p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)  # fmt: skip
    val = split.val[:windows].to(device)
    if val.shape[1] - 1 > net.cfg.seq_len:
        raise ValueError(f"validation windows of {val.shape[1] - 1} characters exceed model.seq_len={net.cfg.seq_len}")
    x, y = val[:, :-1], val[:, 1:]
    logits = torch.cat([predict_recurrent(net, xb, **opts) for xb in x.split(256)])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()
    sample = generate_recurrent(net, encode(prompt), sample_chars, **opts)
    metrics = {
        "val_loss": ce,
        "val_bpc": ce / math.log(2),
        "val_accuracy": (logits.argmax(-1) == y).double().mean().item(),
        "sample_text": decode(sample.tolist()),
    }
    if not baseline:  # the sampler's first call alone: the core's predictive distribution from pure noise
        first = torch.cat([first_call_logits(net, xb, seed=seed, sigma_max=plan[0].hi, sigma_data=sigma_data)
                           for xb in x.split(256)])  # fmt: skip
        metrics["val_loss_first_call"] = F.cross_entropy(first.flatten(0, 1).float(), y.flatten()).item()
    return metrics
