"""From config to a block: the one place that knows which network, loss and plan a family uses.

A family (``model.family``) supplies four things: ``build(cfg, spec, *, baseline, seed)`` (block
``spec.index``'s network, or the end-to-end baseline), the per-sample block loss (Eq. 6), the
baseline's loss, and how its noise levels are drawn and partitioned. Everything else (trainer,
worker, coordinator, registry) is the same for every family.

| family      | data   | blocks train                                   | end-to-end baseline            |
|-------------|--------|------------------------------------------------|--------------------------------|
| dit         | digits | class-conditional image denoiser (weighted L2) | the same DiT, B = 1            |
| vit         | digits | noisy label embedding in the CLS slot (w * CE) | a standard ViT classifier (CE) |
| ar          | text   | next-token embedding given the clean past      | a causal LM (next-token CE)    |
| mdm         | text   | MD4 masked-token CE on the block's t interval  | MD4, B = 1 (all of t in [0,1]) |
| recurrent   | text   | the recurrent core as ONE denoiser, one pass   | the same shapes, truncated BPTT|
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn as nn

from .config import ModelConfig, RunConfig
from .plan import BlockSpec, make_plan, make_time_plan
from .precond import denoise
from .seeds import block_seed, seeded
from .trainer import BlockTrainer, LevelFn, LossFn, uniform_levels


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]  # (family cfg, spec, *, baseline, seed) -> network
    loss: LossFn  # a block's per-sample loss
    baseline_loss: LossFn  # the end-to-end baseline's per-sample loss
    levels: LevelFn | None = None  # None: sigma from the block's truncated log-normal; else e.g. MDM's t
    one_block: bool = False  # recurrent: the core is a single block over the whole sigma range


def family(model: ModelConfig) -> Family:
    """The family of ``model.family`` (its module is imported only when asked for)."""
    if model.family == "dit":
        from .models.dit import build_dit, dit_loss

        return Family(build_dit, dit_loss, dit_loss)
    if model.family == "vit":
        from .models.vit import build_vit, vit_baseline_loss, vit_loss

        return Family(build_vit, vit_loss, vit_baseline_loss)
    if model.family == "ar":
        from .models.ar import ar_baseline_loss, ar_loss, build_ar

        return Family(build_ar, ar_loss, ar_baseline_loss)
    if model.family == "mdm":
        from .models.mdm import build_mdm, mdm_baseline_loss, mdm_loss

        return Family(build_mdm, mdm_loss, mdm_baseline_loss, levels=uniform_levels)
    from .models.recurrent import build_recurrent, recurrent_baseline_loss, recurrent_loss

    return Family(build_recurrent, recurrent_loss, recurrent_baseline_loss, one_block=True)


def plan_for(cfg: RunConfig, num_blocks: int) -> list[BlockSpec]:
    """The plan of ``num_blocks`` blocks over the family's noise levels (sigma, or MDM's t)."""
    layers = cfg.model.resolved().layers
    if cfg.model.family == "mdm":
        from .models.mdm import partition_times

        return make_time_plan(partition_times(num_blocks, cfg.model.resolved().schedule), layers, gamma=cfg.blocks.gamma)
    n = cfg.noise
    return make_plan(
        num_blocks, layers, gamma=cfg.blocks.gamma, partition=cfg.blocks.partition,
        sigma_min=n.sigma_min, sigma_max=n.sigma_max, p_mean=n.p_mean, p_std=n.p_std,
    )  # fmt: skip


def model_plans(cfg: RunConfig) -> dict[str, list[BlockSpec]]:
    """``blocks``: the DiffusionBlocks plan; ``e2e``: the end-to-end baseline (one block of all L
    layers, trained with the family's baseline objective). For the DiT, B = 1 *is* the baseline."""
    one = family(cfg.model).one_block
    plans = {"blocks": plan_for(cfg, cfg.blocks.num)} if cfg.blocks.num > 1 or one else {}
    if cfg.baseline or not plans:
        plans["e2e"] = plan_for(cfg, 1)
    return plans


def eval_ranges(cfg: RunConfig) -> list[tuple[float, float]]:
    """The ranges of the per-range held-out loss: the DiffusionBlocks plan's, for both models."""
    return [(s.lo, s.hi) for s in model_plans(cfg).get("blocks", plan_for(cfg, 1))]


def build_block(model: ModelConfig, spec: BlockSpec, seed: int, *, baseline: bool = False) -> nn.Module:
    """Block ``spec.index``'s network (or the baseline), initialised from (seed, block) alone."""
    with seeded(block_seed(seed, spec.index, "init")):
        return family(model).build(model.resolved(), spec, baseline=baseline, seed=seed)


def block_loss(model: ModelConfig, *, baseline: bool = False) -> LossFn:
    """The family's per-sample loss: Eq. 6 for a block, the baseline's objective for ``baseline``."""
    fam = family(model)
    return fam.baseline_loss if baseline else fam.loss


def make_trainer(cfg: RunConfig, spec: BlockSpec, *, baseline: bool = False, device=None) -> BlockTrainer:
    """A BlockTrainer for one block (or the baseline) of this run: network, loss and level sampler."""
    net = build_block(cfg.model, spec, cfg.seed, baseline=baseline)
    if device is not None:
        net = net.to(device)
    fam = family(cfg.model)
    return BlockTrainer(net, spec, block_loss(cfg.model, baseline=baseline), cfg.train, cfg.noise, cfg.seed, fam.levels)


def block_denoiser(net: nn.Module, sigma_data: float = 0.5):
    """D(z, sigma, **cond) for a trained DiT block (EDM preconditioning around it)."""
    return partial(denoise, net.eval(), sigma_data=sigma_data)


def family_denoiser(model: ModelConfig, net: nn.Module, sigma_data: float = 0.5):
    """A trained block as the sampler's callable ``D(z, sigma, **cond)``: the DiT's denoised image,
    the expected label/token embedding of the discrete families, MDM's reverse step at t."""
    if model.family == "dit":
        return block_denoiser(net, sigma_data)
    if model.family == "vit":
        from .models.vit import vit_denoiser as make
    elif model.family == "ar":
        from .models.ar import ar_denoiser as make
    elif model.family == "mdm":
        from .models.mdm import mdm_denoiser as make
    else:
        from .models.recurrent import recurrent_denoiser as make
    return make(net.eval(), sigma_data)


def block_from_export(tensors: dict, meta: dict) -> tuple[nn.Module, BlockSpec]:
    """Rebuild a finished block from its exported EMA weights and metadata (worker export, registry)."""
    spec = BlockSpec(**meta["spec"])
    model = ModelConfig(**meta["model"])
    net = family(model).build(model.resolved(), spec, baseline=meta.get("baseline", False), seed=meta["seed"])
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), spec
