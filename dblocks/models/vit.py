"""ViT classification on digits as DiffusionBlocks (design.md 1.5, 2.1; paper Sec. 4.1).

The target is the label, as a row of the FIXED table E = fixed_embedding(num_classes, width, seed)
(unit-norm rows, built from the run seed, never trained, so every block agrees on it without
sharing a parameter). A block denoises the noisy label embedding z = E[y] + sigma eps:

    tokens  = [c_in z ; patch_embed(x) + pos]          c_in only on the label token (slot 0)
    h       = L/B adaLN-Zero layers(tokens | sigma emb) token 0 of the output, (N, D)
    logits  = head(adaLN(c_out h + c_skip z))           the skip sits before the classifier
    loss    = w(sigma) CE(logits, y)                    Eq. 6 for a discrete target
    D(z)    = softmax(logits) @ E                       the denoised estimate for the sampler

Each ``ViTBlock`` owns its patch embedding, sigma embedder, layers, final adaLN and classifier.
The end-to-end baseline (``ViTBaseline``) is a plain pre-LN ViT with a learned CLS token. The
loss, the denoiser and the chained prediction live in ``dblocks/families/vit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn as nn

from ..embedding import fixed_embedding
from ..precond import SIGMA_DATA, edm_readout, edm_scalings
from .dit import fourier_features, sincos_pos_embed
from .layers import DiTLayer, PreLNLayer, embedder, modulate, normal_init, xavier_init, zero_init
from .sizes import sized


class Readout(StrEnum):
    """Where a block's final LayerNorm sits relative to the EDM skip c_out h + c_skip z."""

    skip_then_norm = "skip_then_norm"  # ours: head(adaLN(c_out h + c_skip z)), design.md 1.5
    norm_then_skip = "norm_then_skip"  # the official code: head(c_out adaLN(h) + c_skip z)


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8
    channels: int = 1
    patch: int = 2
    width: int = 64
    heads: int = 4
    layers: int = 6  # total depth L; a block holds layers // B of them
    mlp_ratio: float = 4.0
    num_classes: int = 10
    freq_dim: int = 64  # sinusoidal features of c_noise fed to the sigma embedder
    readout: str = "skip_then_norm"  # Readout: the final LayerNorm after (ours) or before (official) the skip

    def __post_init__(self) -> None:
        if self.readout not in Readout.__members__:
            raise ValueError(f"model.readout={self.readout!r}: choose one of {', '.join(Readout)}")
        if self.layers < 1:
            raise ValueError(f"model.layers={self.layers}: must be >= 1")
        if self.patch < 1 or self.image_size % self.patch:
            raise ValueError(f"model.patch={self.patch}: must divide the image size {self.image_size}")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"model.heads={self.heads}: must divide model.width={self.width}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}: must be > 0")
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: must be >= 2")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim}: must be an even number >= 2")


# ``debug`` trains in seconds; ``tiny`` is the benchmark/experiment size.
VIT_SIZES: dict[str, ViTConfig] = {
    "debug": ViTConfig(width=32, heads=2, layers=6, freq_dim=32),
    "tiny": ViTConfig(width=64, heads=4, layers=12),  # the paper's depth: B=3 blocks of 4 layers
    "s4": ViTConfig(width=384, heads=6, layers=12, patch=4, freq_dim=256),  # ViT-S/4 for 32x32 (CIFAR-100)
}


def vit_config(size: str, **overrides) -> ViTConfig:
    """The registered size, with non-None overrides (e.g. ``layers=12``)."""
    return sized(VIT_SIZES, size, "vit", **overrides)


def token_pos_embed(width: int, grid: int) -> torch.Tensor:
    """(1 + grid*grid, width): a zero row for the label/CLS slot 0, then the fixed 2-D sin-cos
    embedding of the patches (MAE's ``cls_token=True`` layout)."""
    return torch.cat([torch.zeros(1, width), sincos_pos_embed(width, grid)])


class ViTBlock(nn.Module):
    """One DiffusionBlocks block: logits = head(adaLN(c_out F(c_in z, x, c_noise) + c_skip z))."""

    def __init__(self, cfg: ViTConfig, num_layers: int, seed: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.register_buffer("pos_embed", token_pos_embed(d, cfg.image_size // cfg.patch), persistent=False)
        # The fixed target table: persistent (exported weights are self-contained), never a Parameter.
        self.register_buffer("label_table", fixed_embedding(cfg.num_classes, d, seed))
        self.sigma_embed = embedder(cfg.freq_dim, d)
        self.layers = nn.ModuleList(DiTLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: xavier linears; adaLN-Zero modulations, final adaLN and head start at zero."""
        xavier_init(self, self.patch_embed)
        normal_init(self.sigma_embed[0].weight, self.sigma_embed[2].weight)
        zero_init(*(layer.ada[1] for layer in self.layers), self.final_ada[1], self.head)

    def forward(
        self, z: torch.Tensor, sigma: torch.Tensor, images: torch.Tensor, *, sigma_data: float = SIGMA_DATA
    ) -> torch.Tensor:
        """Logits (N, K) from the noisy label embedding z (N, D), sigma (N,), images (N, C, H, W)."""
        _, _, c_in, c_noise = edm_scalings(sigma, sigma_data)
        label = c_in.to(z.dtype)[:, None] * z  # (N, D): c_in on the label token only
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, T-1, D)
        h = torch.cat([label[:, None], patches], dim=1) + self.pos_embed  # (N, T, D)
        c = self.sigma_embed(fourier_features(c_noise.to(z.dtype), self.cfg.freq_dim))  # (N, D)
        for layer in self.layers:
            h = layer(h, c)
        return self.head(READOUTS[Readout(self.cfg.readout)](self, h[:, 0], z, sigma, sigma_data, c))  # (N, K)

    def final_layer(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """adaLN(u | c): the final LayerNorm, modulated by the sigma embedding c, (N, D)."""
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return modulate(self.final_norm(u)[:, None], shift, scale)[:, 0]


def skip_then_norm(block: ViTBlock, h: torch.Tensor, z: torch.Tensor, sigma, sigma_data: float, c) -> torch.Tensor:
    """adaLN(c_out h + c_skip z): the denoised label embedding, normalised before the classifier (design.md 1.5)."""
    return block.final_layer(edm_readout(h, z, sigma, sigma_data), c)


def norm_then_skip(block: ViTBlock, h: torch.Tensor, z: torch.Tensor, sigma, sigma_data: float, c) -> torch.Tensor:
    """c_out adaLN(h) + c_skip z: the official code's order, the skip added after the final layer."""
    return edm_readout(block.final_layer(h, c), z, sigma, sigma_data)


READOUTS = {Readout.skip_then_norm: skip_then_norm, Readout.norm_then_skip: norm_then_skip}


class ViTBaseline(nn.Module):
    """The end-to-end baseline: a plain ViT classifier of L layers, learned CLS token in slot 0,
    final LayerNorm on token 0, linear head. Same patch size, width and fixed position embedding
    as the blocks, so the comparison isolates the training method."""

    def __init__(self, cfg: ViTConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.register_buffer("pos_embed", token_pos_embed(d, cfg.image_size // cfg.patch), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.layers = nn.ModuleList(PreLNLayer(d, cfg.heads, cfg.mlp_ratio, eps=1e-6) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """The original ViT init: xavier linears, zero biases, CLS token and head at zero."""
        xavier_init(self, self.patch_embed)
        zero_init(self.head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, T-1, D)
        h = torch.cat([self.cls_token.expand(len(images), -1, -1), patches], dim=1) + self.pos_embed
        for layer in self.layers:
            h = layer(h)
        return self.head(self.final_norm(h[:, 0]))  # (N, K)


def build_vit(cfg: ViTConfig, spec, *, baseline: bool, seed: int) -> nn.Module:
    """Block ``spec.index`` (``spec.num_layers`` layers), or the end-to-end baseline of
    ``spec.num_layers`` layers. ``seed`` (the run seed) only fixes the label table."""
    if baseline:
        return ViTBaseline(cfg, spec.num_layers)
    return ViTBlock(cfg, spec.num_layers, seed)
