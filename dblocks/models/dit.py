"""Class-conditional DiT (Peebles & Xie 2023) cut into independent DiffusionBlocks blocks.

One ``DiTBlock`` is one block of the paper's Sec. 4.2: its own patch embedding, its own
sigma (c_noise) and label embedders, L/B adaLN-Zero transformer layers, and its own final
layer + unpatchify. No parameter is shared between blocks (design.md Sec. 2.1), so a block
can train alone on its own worker. With B=1 and L layers, the same class is the end-to-end
baseline.

The network here is the raw F of EDM; :func:`dblocks.precond.denoise` wraps it into D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DiTLayer, embedder, final_adaln, normal_init, xavier_init, zero_init
from .sizes import sized


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 8
    channels: int = 1
    patch: int = 2
    width: int = 64
    heads: int = 4
    layers: int = 6  # total depth L of the whole model; a block holds layers // B of them
    mlp_ratio: float = 4.0
    num_classes: int = 10
    freq_dim: int = 64  # sinusoidal features of c_noise fed to the sigma embedder
    label_dropout: float = 0.1  # for classifier-free guidance

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"model.layers={self.layers}: must be >= 1")
        if self.image_size % self.patch:
            raise ValueError(f"model.patch={self.patch}: must divide the image size {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"model.heads={self.heads}: must divide model.width={self.width}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"model.label_dropout={self.label_dropout}: must be in [0, 1)")


# Size registry (as DiT's ``DiT_models``). ``debug`` trains in seconds; ``small`` is the benchmark size.
DIT_SIZES: dict[str, DiTConfig] = {
    "debug": DiTConfig(width=32, heads=2, layers=6, freq_dim=32),
    "tiny": DiTConfig(width=64, heads=4, layers=6),
    "small": DiTConfig(width=128, heads=4, layers=12),
    "s2": DiTConfig(width=384, heads=6, layers=12, patch=2, freq_dim=256),  # DiT-S/2 (the paper's CIFAR-10)
}


def dit_config(size: str, **overrides) -> DiTConfig:
    """The registered size, with non-None overrides (e.g. ``layers=12``)."""
    return sized(DIT_SIZES, size, "dit", **overrides)


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, width) (not trainable)."""
    pos = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    parts = []
    for coord in (yy.flatten(), xx.flatten()):
        ang = coord[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, width - emb.shape[1])).float()


def fourier_features(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of c_noise = ln(sigma)/4, (N,) -> (N, dim) (DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
    # c_noise spans about [-1.6, 1.1]; scale so the low frequencies resolve it.
    ang = (250.0 * c_noise.float())[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class DiTBlock(nn.Module):
    """One DiffusionBlocks block: F(c_in z, c_noise, label) -> image-shaped output."""

    def __init__(self, cfg: DiTConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch, cfg.width
        self.grid = cfg.image_size // p
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid), persistent=False)
        self.sigma_embed = embedder(cfg.freq_dim, d)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d)  # index num_classes = "no label"
        self.layers = nn.ModuleList(DiTLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, p * p * cfg.channels)
        self._init_weights()

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def _init_weights(self) -> None:
        xavier_init(self, self.patch_embed)
        normal_init(self.label_embed.weight, self.sigma_embed[0].weight, self.sigma_embed[2].weight)
        # adaLN-Zero: every residual branch and the head start at zero.
        zero_init(*(layer.ada[1] for layer in self.layers), self.final_ada[1], self.head)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, ch, hw, _ = x.shape  # (N, C, H, W)
        p, g = self.cfg.patch, self.grid
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.sigma_embed(fourier_features(c_noise, self.cfg.freq_dim)) + self.label_embed(labels)  # (N, D)
        for layer in self.layers:
            h = layer(h, c)
        out = self.head(final_adaln(self.final_norm, self.final_ada, h, c))  # (N, T, p*p*C)
        out = out.reshape(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return out.reshape(n, ch, hw, hw)


def build_dit(cfg: DiTConfig, spec, *, baseline: bool = False, seed: int = 0) -> DiTBlock:
    """A block of ``spec.num_layers`` layers; the end-to-end baseline is the same class with all L."""
    return DiTBlock(cfg, spec.num_layers)
