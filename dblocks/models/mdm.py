"""Masked-diffusion character LM (MD4: Shi et al. 2024) cut into DiffusionBlocks blocks (design.md 1.5).

The noise level is the masking time t in [0, 1] (``dblocks/masking.py``: the schedules, the forward
process and the ELBO). A block predicts logits over the 84 real characters at every position (never
the mask); MD4's carry-over ("SUBS") keeps every unmasked token as it is, so only masked positions
are predicted and scored:

    logits   = head(adaLN(L/B adaLN-Zero layers(embed(z) + pos | t emb)))      (N, T, V)

Blocks partition alpha by equal decrements: alpha(t_b) = 1 - b/B (linear alpha gives t_b = b/B).
Block 0 owns the noisiest interval (t near 1) and block B-1 the cleanest, as with sigma. Each
block owns its token and position embeddings, t embedder, layers, final adaLN and head; the
target space is the token ids themselves, so no shared table is needed. With one block of all
L layers trained on t in [0, 1] the same class is the end-to-end MD4 baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..masking import get_schedule
from .dit import fourier_features
from .layers import DiTLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized


@dataclass(frozen=True)
class MDMConfig:
    vocab_size: int = 84  # the real characters (dblocks.text.VOCAB); the mask token is id vocab_size
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


def build_mdm(cfg: MDMConfig, spec, *, baseline: bool = False, seed: int = 0) -> MDMBlock:
    """A block of ``spec.num_layers`` layers; the baseline (end-to-end MD4) is the same class with all
    L layers trained on t in [0, 1]. ``seed`` is unused: the target space is the token ids."""
    return MDMBlock(cfg, spec.num_layers)
