"""From config to a block: plans, networks and trainers of a run, through the family registry.

Every family-specific answer (network, loss, noise levels, denoiser) comes from the run's
:class:`~dblocks.families.base.Family` (``cfg.family``); this module only puts them together, the
same way for every family. Trainer, worker, coordinator and registry call these.

| family      | data   | blocks train                                   | end-to-end baseline            |
|-------------|--------|------------------------------------------------|--------------------------------|
| dit         | digits | class-conditional image denoiser (weighted L2) | the same DiT, B = 1            |
| vit         | digits | noisy label embedding in the CLS slot (w * CE) | a standard ViT classifier (CE) |
| ar          | text   | next-token embedding given the clean past      | a causal LM (next-token CE)    |
| mdm         | text   | MD4 masked-token CE on the block's t interval  | MD4, B = 1 (all of t in [0,1]) |
| recurrent   | text   | the recurrent core as ONE denoiser, one pass   | the same shapes, truncated BPTT|
"""

from __future__ import annotations

import torch.nn as nn

from .config import RunConfig, model_config
from .families import get_family
from .families.base import Array, eval_ranges, plan_for
from .levels import Levels, SigmaLevels
from .plan import BlockSpec
from .precision import checkpoint_layers, mode_for
from .seeds import block_seed, seeded
from .trainer import BlockTrainer

__all__ = [
    "block_from_export",
    "build_block",
    "eval_ranges",
    "export_levels",
    "make_trainer",
    "model_plans",
    "plan_for",
]


def model_plans(cfg: RunConfig) -> dict[str, list[BlockSpec]]:
    """``blocks``: the DiffusionBlocks plan; ``e2e``: the end-to-end baseline (one block of all L
    layers, trained with the family's baseline objective). For the DiT, B = 1 *is* the baseline."""
    plans = {"blocks": plan_for(cfg, cfg.blocks.num)} if cfg.blocks.num > 1 or cfg.family.one_block else {}
    if cfg.baseline or not plans:
        plans["e2e"] = plan_for(cfg, 1)
    return plans


def build_block(cfg: RunConfig, spec: BlockSpec, *, baseline: bool = False) -> nn.Module:
    """Block ``spec.index``'s network (or the baseline), initialised from (seed, block) alone."""
    with seeded(block_seed(cfg.seed, spec.index, "init")):
        return cfg.family.build(cfg.model.resolved(), spec, baseline=baseline, seed=cfg.seed)


def make_trainer(cfg: RunConfig, spec: BlockSpec, *, baseline: bool = False, device=None) -> BlockTrainer:
    """A BlockTrainer for one block (or the baseline) of this run: network, loss and level sampler."""
    net = build_block(cfg, spec, baseline=baseline)
    if device is not None:
        net = net.to(device)
    weighted = cfg.train.loss_weighting
    loss = cfg.family.loss(
        cfg.model.resolved(), cfg.levels, baseline=baseline, weighted=weighted, ce_weighting=cfg.train.ce_weighting
    )
    mode = mode_for(cfg.train.precision)
    mode.check(next(net.parameters()).device)
    trainer = BlockTrainer(net, spec, loss, cfg.train, cfg.levels, cfg.seed, mode)
    # After the trainer's EMA copy: the EMA (evaluated, exported) stays a plain eager module.
    if cfg.train.activation_checkpointing:
        checkpoint_layers(trainer.net)
    if cfg.train.compile:
        trainer.net.compile()  # in place: parameter names, state_dict and checkpoints are unchanged
    return trainer


def block_from_export(tensors: dict, meta: dict) -> tuple[nn.Module, BlockSpec]:
    """Rebuild a finished block from its exported EMA weights and metadata (worker export, registry)."""
    spec = BlockSpec(**meta["spec"])
    model = model_config(meta["model"])
    family = get_family(model.family)
    net = family.build(model.resolved(), spec, baseline=meta.get("baseline", False), seed=meta["seed"])
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), spec


def export_arrays(meta: dict) -> tuple[dict[str, Array], Array] | None:
    """What an exported block's registered ``predict`` takes and returns (``Family.predict_arrays``);
    None for an end-to-end baseline that is not a denoiser (used through ``.net``)."""
    model = model_config(meta["model"])
    family = get_family(model.family)
    if meta.get("baseline") and not family.baseline_is_denoiser:
        return None
    return family.predict_arrays(model.resolved())


def export_levels(meta: dict) -> Levels:
    """The noise levels of an exported block (its family's space, from its meta's model and noise)."""
    model = model_config(meta["model"])
    return get_family(model.family).levels_of(model.resolved(), SigmaLevels(**meta["noise"]))
