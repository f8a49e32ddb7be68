"""From config to a block: the one place that knows which network and loss a family uses."""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from .config import ModelConfig
from .models.dit import DiTBlock, dit_loss
from .plan import BlockSpec
from .precond import denoise
from .seeds import block_seed, seeded
from .trainer import LossFn


def build_block(model: ModelConfig, spec: BlockSpec, seed: int) -> nn.Module:
    """Block ``spec.index``'s network, initialised from (seed, block) alone: any worker can build it."""
    with seeded(block_seed(seed, spec.index, "init")):
        return DiTBlock(model.dit(), spec.num_layers)


def block_loss(model: ModelConfig) -> LossFn:
    """The family's per-sample Eq. 6 loss."""
    return dit_loss


def block_denoiser(net: nn.Module, sigma_data: float = 0.5):
    """D(z, sigma, **cond) for a trained block network (EDM preconditioning around it)."""
    return partial(denoise, net.eval(), sigma_data=sigma_data)


def block_from_export(tensors: dict, meta: dict) -> tuple[nn.Module, BlockSpec]:
    """Rebuild a finished block from its exported EMA weights and metadata (worker export, registry)."""
    spec = BlockSpec(**meta["spec"])
    net = DiTBlock(ModelConfig(**meta["model"]).dit(), spec.num_layers)
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), spec
