"""Recurrent-depth character LM (Geiping et al. 2025) as ONE DiffusionBlocks block (design.md 1.5).

Geiping et al. split a causal LM into a prelude P, a recurrent core R and a coda C:
``e = P(x)``, ``s_0 ~ N(0, init_std^2 I)``, ``s_k = R(e, s_{k-1})`` for k = 1..K, ``logits = C(s_K)``,
trained with truncated backprop through time: the end-to-end baseline (:class:`RecurrentBaseline`).

DiffusionBlocks replaces the recurrence by denoising (:class:`RecurrentBlock`): the core is one
sigma-conditioned denoiser of the NEXT token's fixed embedding, trained in a single pass at a random
sigma (Eq. 6; no unrolling) and run as K Euler steps at inference (``dblocks/families/recurrent.py``):

    z_i = E[y_i] + sigma eps_i                            (y_i = x_{i+1}, E the fixed table)
    h   = core(e + c_in z, c(sigma))                      (c = the block's own sigma embedder)
    logits = coda(c_out h + c_skip z, c(sigma))           loss = w(sigma) CE(logits, y)

What position i sees (every attention is causal): the clean tokens x_0..x_i (through e), and
z_0..z_i. z_i is the noisy target itself; z_j (j < i) is a noisy copy of y_j = x_{j+1}, a clean
token <= i that position i already sees, so nothing of x_{>i} or z_{>i} reaches position i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..embedding import fixed_embedding
from ..precond import SIGMA_DATA, edm_readout, edm_scalings
from .dit import fourier_features
from .layers import DiTLayer, PreLNLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized


@dataclass(frozen=True)
class RecurrentConfig:
    vocab_size: int = 84  # the Shakespeare characters (dblocks.text.VOCAB)
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
        c_in, c_noise = (s.to(z.dtype).reshape(-1, 1, 1) for s in edm_scalings(sigma, sigma_data)[2:])
        c = self.condition(c_noise.flatten())  # (N, D)
        h = self.core(context + c_in * z, c)
        return self.coda(edm_readout(h, z, sigma, sigma_data), c)


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


def build_recurrent(cfg: RecurrentConfig, spec, *, baseline: bool = False, seed: int = 0) -> RecurrentLM:
    """The one block (B = 1, all L = prelude + core + coda layers), or the truncated-BPTT baseline."""
    if spec.num_blocks != 1:
        raise ValueError(
            f"blocks.num={spec.num_blocks}: the recurrent family trains its core as one block; use blocks.num=1"
        )
    if spec.num_layers != cfg.layers:
        raise ValueError(f"block of {spec.num_layers} layers, but model.prelude+core+coda = {cfg.layers}")
    return (RecurrentBaseline if baseline else RecurrentBlock)(cfg, seed)
