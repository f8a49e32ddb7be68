"""How a block trains on its device: precision (autocast, loss scaling) and activation checkpointing.

``train.precision`` picks one :class:`Mode` from ``MODES``; the trainer asks it for an autocast
context around the forward and loss, and for a gradient scaler around backward and the optimizer
step. Parameters, optimizer state and the EMA stay fp32 in every mode, and so do the EDM
preconditioning and the loss weight: autocast lowers only matmuls and convolutions, and every
family's loss returns fp32 per-sample values (the trainer casts them before reducing).

``checkpoint_layers(net)`` recomputes each layer's activations in backward instead of storing them
(the paper's App. G names it, with DiffusionBlocks, as the lowest-memory combination): the gradients
are bit-identical, the saved activations of a block drop from one per layer to one per block input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import Precision
from .errors import ConfigError

__all__ = ["MODES", "Mode", "checkpoint_layers", "mode_for"]


@dataclass(frozen=True)
class Mode:
    """One ``train.precision``: the autocast dtype (None: fp32, no autocast) and whether the loss is scaled."""

    name: str
    dtype: torch.dtype | None
    scaled: bool = False  # fp16's narrow exponent: a dynamic loss scale keeps small gradients alive
    cuda_only: bool = False

    def check(self, device: torch.device) -> None:
        """A one-line config error when this mode cannot run on ``device``."""
        if self.cuda_only and device.type != "cuda":
            raise ConfigError(
                f"train.precision={self.name}: needs CUDA (GradScaler); on {device.type} use bf16 or fp32"
            )

    def autocast(self, device: torch.device):
        """The context the forward and loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The gradient scaler (disabled, a pass-through, unless ``scaled``)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


MODES: dict[Precision, Mode] = {
    Precision.fp32: Mode("fp32", None),
    Precision.bf16: Mode("bf16", torch.bfloat16),
    Precision.fp16: Mode("fp16", torch.float16, scaled=True, cuda_only=True),
}


def mode_for(precision: str) -> Mode:
    return MODES[Precision(precision)]


def checkpoint_layers(net: nn.Module) -> int:
    """Activation checkpointing per layer: every layer of every ``layers`` ModuleList in ``net``
    recomputes its forward during backward. Returns the number of layers wrapped."""
    wrapped = 0
    for module in net.modules():
        layers = getattr(module, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        for layer in layers:
            layer.forward = partial(checkpoint, type(layer).forward, layer, use_reentrant=False)
            wrapped += 1
    return wrapped
