"""Autoregressive character LM cut into independent DiffusionBlocks blocks (design.md 1.5, 2.1).

A block diffuses the NEXT token's embedding conditioned on the clean past. The target of clean
token x_{i+1} = y_i is its row of the fixed table E (``fixed_embedding``, from the run seed,
never trained), noised as z_i = E[y_i] + sigma eps_i (one sigma per sample). The block reads the
clean stream x_0..x_{T-1} and the noisy stream z_0..z_{T-1} as one sequence of length 2T under
the Block-Diffusion mask (:func:`ar_attention_mask`): clean tokens are causal; noisy token i sees
the clean tokens j <= i (the past of the token it predicts) and itself, nothing else. Its output
h_i gives the logits through ``c_out h_i + c_skip z_i -> final adaLN -> linear`` (as the ViT
family's label token), and the denoised estimate is ``softmax(logits) @ E`` (Sec. 3.4).

Because noisy tokens never see each other and clean tokens never see noisy ones, the noisy
stream may be any suffix of positions: all T in training and teacher-forced evaluation, only the
last one when decoding (loss, decoding and evaluation: ``dblocks/families/ar.py``).

The end-to-end baseline (``ARBaseline``) is a plain causal transformer LM of all L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..embedding import fixed_embedding
from ..precond import SIGMA_DATA, edm_readout, edm_scalings
from .dit import fourier_features
from .layers import DiTLayer, PreLNLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized


@dataclass(frozen=True)
class ARConfig:
    vocab_size: int = 84  # the Shakespeare characters (dblocks.text.VOCAB)
    seq_len: int = 64  # context T in characters; a training window holds seq_len + 1 tokens
    width: int = 64
    heads: int = 4
    layers: int = 8  # total depth L; a block holds layers // B of them (paper: B = 4 for text)
    mlp_ratio: float = 4.0
    freq_dim: int = 64  # sinusoidal features of c_noise fed to the sigma embedder
    mixed: bool = False  # add the plain next-token loss at the lowest-noise block

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"model.vocab_size={self.vocab_size}: must be >= 2")
        if self.seq_len < 1:
            raise ValueError(f"model.seq_len={self.seq_len}: must be >= 1 character")
        if self.layers < 1:
            raise ValueError(f"model.layers={self.layers}: must be >= 1")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"model.heads={self.heads}: must be >= 1 and divide model.width={self.width}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}: must be > 0")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim}: must be an even number >= 2")


AR_SIZES: dict[str, ARConfig] = {
    "debug": ARConfig(width=32, heads=2, layers=4, seq_len=32, freq_dim=32),
    "tiny": ARConfig(width=64, heads=4, layers=8, seq_len=64),
}


def ar_config(size: str, **overrides) -> ARConfig:
    """The registered size, with non-None overrides (e.g. ``mixed=True``)."""
    return sized(AR_SIZES, size, "ar", **overrides)


def ar_attention_mask(t: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """Block-Diffusion mask (design.md 1.5) over [clean x_0..x_{t-1} ; noisy z_{t-m}..z_{t-1}], True = attend.

    The query at position p (clean x_p, or noisy z_p = the noisy version of y_p = x_{p+1}) sees
    the clean keys j <= p; a noisy query also sees itself, and no query sees any other noisy token.
    So noisy z_p never sees x_{p+1}, the clean copy of its own target. (t+m, t+m) bool.
    """
    if not 0 <= m <= t:
        raise ValueError(f"noisy stream of {m} tokens for a context of {t}: need 0 <= m <= t")
    pos = torch.cat([torch.arange(t, device=device), torch.arange(t - m, t, device=device)])
    clean = torch.arange(t + m, device=device) < t
    past = clean[None, :] & (pos[None, :] <= pos[:, None])
    itself = torch.eye(t + m, dtype=torch.bool, device=device) & ~clean[None, :]
    return past | itself


class ARBlock(nn.Module):
    """One DiffusionBlocks block of the AR LM: logits of the next token from (clean past, noisy z, sigma).

    Owns its token and position embeddings, noisy-input projection, sigma embedder, layers and
    head; ``target_table`` is the fixed, persistent (exported) buffer E. With ``next_head`` (the
    mixed objective, lowest-noise block only) it also predicts y_i from the clean stream alone.
    """

    def __init__(self, cfg: ARConfig, num_layers: int, *, seed: int, next_head: bool = False):
        super().__init__()
        self.cfg = cfg
        d, k = cfg.width, cfg.vocab_size
        self.register_buffer("target_table", fixed_embedding(k, d, seed), persistent=True)
        self.tok_embed = nn.Embedding(k, d)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.noisy_in = nn.Linear(d, d)
        self.sigma_embed = embedder(cfg.freq_dim, d)
        self.layers = nn.ModuleList(DiTLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, k)
        self.next_norm = nn.LayerNorm(d) if next_head else None
        self.next_head = nn.Linear(d, k) if next_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        xavier_init(self)
        normal_init(self.tok_embed.weight, self.pos_embed, self.sigma_embed[0].weight, self.sigma_embed[2].weight)
        # adaLN-Zero: every residual branch and both heads start at zero (uniform logits).
        zero_init(*(layer.ada[1] for layer in self.layers), self.final_ada[1], self.head)
        if self.next_head is not None:
            zero_init(self.next_head)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, T) clean ids; z (N, M, D) noisy targets of the LAST M positions (M <= T); sigma (N,).

        Returns (logits (N, M, K) of y_{T-M..T-1}, next-token logits (N, T, K) of the clean stream or None).
        """
        n, t = x.shape
        m = z.shape[1]
        c_in, c_noise = (s.to(z.dtype)[:, None, None] for s in edm_scalings(sigma, sigma_data)[2:])
        pos = self.pos_embed[:t]
        clean = self.tok_embed(x) + pos  # (N, T, D)
        noisy = self.noisy_in(c_in * z) + pos[t - m :]  # (N, M, D); c_in on the noisy targets only
        c = self.sigma_embed(fourier_features(c_noise.flatten(), self.cfg.freq_dim))  # (N, D)
        h = torch.cat([clean, noisy], dim=1)  # (N, T+M, D)
        mask = ar_attention_mask(t, m, x.device)
        for layer in self.layers:
            h = layer(h, c, mask=mask)
        u = edm_readout(h[:, t:], z, sigma, sigma_data)  # design.md 1.5: c_out h + c_skip z, then final adaLN
        logits = self.head(final_adaln(self.final_norm, self.final_ada, u, c))
        next_logits = self.next_head(self.next_norm(h[:, :t])) if self.next_head is not None else None
        return logits, next_logits


class ARBaseline(nn.Module):
    """The end-to-end baseline: a causal transformer LM, ids (N, T) -> next-token logits (N, T, K)."""

    def __init__(self, cfg: ARConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.layers = nn.ModuleList(PreLNLayer(d, cfg.heads, cfg.mlp_ratio, causal=True) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size)
        xavier_init(self)
        normal_init(self.tok_embed.weight, self.pos_embed)
        zero_init(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embed(x) + self.pos_embed[: x.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.final_norm(h))


def build_ar(cfg: ARConfig, spec, *, baseline: bool, seed: int) -> nn.Module:
    """Block ``spec.index`` (its ``spec.num_layers`` layers), or the baseline LM of ``spec.num_layers``.

    The mixed next-token head goes on the lowest-noise block only (index B-1). ``seed`` is the
    run seed and builds only the fixed table E; weights come from the global torch RNG.
    """
    if baseline:
        return ARBaseline(cfg, spec.num_layers)
    last = spec.index == spec.num_blocks - 1
    return ARBlock(cfg, spec.num_layers, seed=seed, next_head=cfg.mixed and last)
