"""Transformer pieces shared by the model families.

Every block still builds its own copies (no parameter is shared between blocks, design.md
Sec. 2.1); only the code is shared. Attribute names and the order in which parameters are
created and initialised are part of the checkpoint format and of the seeded init: keep them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(
    qkv: nn.Linear,
    proj: nn.Linear,
    heads: int,
    h: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention proj(MSA(qkv(h))), (N, T, D) -> (N, T, D).

    ``mask``: a boolean (T, T) mask, True = attend; ``causal``: position i attends to <= i.
    """
    n, t, d = h.shape
    q, k, v = qkv(h).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (N, H, T, D/H)
    return proj(a.transpose(1, 2).reshape(n, t, d))


def mlp(width: int, mlp_ratio: float) -> nn.Sequential:
    """The transformer MLP: Linear, tanh-GELU, Linear."""
    hidden = int(width * mlp_ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


def embedder(freq_dim: int, width: int) -> nn.Sequential:
    """The sigma (or t) embedder MLP on sinusoidal features (DiT's TimestepEmbedder)."""
    return nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class PreLNLayer(nn.Module):
    """A standard pre-LN transformer layer (ViT, Dosovitskiy et al. 2021; nanoGPT's Block):
    x + MSA(LN x), then + MLP(LN x). ``causal`` for the language models."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, causal: bool = False, eps: float = 1e-5):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = mlp(width, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + attention(self.qkv, self.proj, self.heads, self.norm1(x), causal=self.causal)
        return x + self.mlp(self.norm2(x))


class DiTLayer(nn.Module):
    """One adaLN-Zero transformer layer (DiT), conditioned on c (N, D); optionally masked or causal."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(width, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * attention(self.qkv, self.proj, self.heads, h, mask=mask, causal=causal)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def final_adaln(norm: nn.Module, ada: nn.Sequential, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """DiT's final adaLN: modulate(norm(h)) with shift and scale from ada(c); h (N, T, D), c (N, D)."""
    shift, scale = ada(c).chunk(2, dim=1)
    return modulate(norm(h), shift, scale)


# ---- initialisation (DiT / ViT) -----------------------------------------------------------------
def xavier_init(net: nn.Module, *convs: nn.Conv2d) -> None:
    """Xavier-uniform weights and zero biases for every Linear of ``net``, then for each conv
    (its kernel as a flattened linear, as DiT's patch embedding)."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for conv in convs:
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)


def normal_init(*weights: torch.Tensor, std: float = 0.02) -> None:
    """N(0, std^2) for each tensor, in order (embedding tables, the sigma embedder)."""
    for w in weights:
        nn.init.normal_(w, std=std)


def zero_init(*linears: nn.Linear) -> None:
    """Zero weights and biases: adaLN-Zero modulations and heads start at zero."""
    for lin in linears:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
