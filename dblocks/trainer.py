"""The single-block trainer: one block, trained alone on the paper's Eq. 6.

A plain class a ``for`` loop can drive (the worker wraps it). It owns the block, AdamW with
gradient clipping, an EMA copy, the step/sample counters and its own ``torch.Generator``, so
a step is exactly reproducible and ``state_dict``/``load_state_dict`` resume bit-exactly.
Only this block's parameters, gradients and optimizer state exist here: ~1/B of the model.
``train.precision`` (dblocks/precision.py) wraps the forward and loss in autocast and, for fp16, the
backward and step in a gradient scaler; in fp32 both are pass-throughs and the step is unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .config import TrainConfig
from .families.base import LossFn
from .levels import Levels
from .plan import BlockSpec
from .precision import Mode, mode_for
from .seeds import block_seed


class BlockTrainer:
    def __init__(
        self,
        net: nn.Module,
        spec: BlockSpec,
        loss_fn: LossFn,
        train: TrainConfig,
        levels: Levels,
        seed: int,
        mode: Mode | None = None,
    ):
        """``loss_fn(net, batch, level, generator)``: the family's per-sample loss (``Family.loss``);
        ``levels`` draws each step's noise levels in the block's training range (sigma, or MDM's t);
        ``mode``: the precision mode (default: ``train.precision``'s)."""
        self.net, self.spec, self.loss_fn, self.train, self.levels = net, spec, loss_fn, train, levels
        self.ema = copy.deepcopy(net).requires_grad_(False)
        params = list(net.parameters())
        self._ema_pairs = (list(self.ema.parameters()), params)  # load_state_dict copies in place: stable
        # The fused kernel (CPU and CUDA) is ~3x faster than the per-tensor loop on small blocks.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.opt = torch.optim.AdamW(
            params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay, fused=fused
        )
        self.generator = torch.Generator().manual_seed(block_seed(seed, spec.index))
        self.device = params[0].device
        self.mode = mode or mode_for(train.precision)
        self.scaler = self.mode.scaler(self.device)
        self.step_count = 0
        self.samples = 0

    def lr_at(self, samples: int) -> float:
        """Linear warm-up over ``warmup_samples``, then constant."""
        if self.train.warmup_samples <= 0:
            return self.train.lr
        return self.train.lr * min(1.0, (samples + 1) / self.train.warmup_samples)

    def ema_beta(self, batch: int) -> float:
        """Per-step EMA decay from a half-life in samples, ramped up early on (EDM's ema_rampup)."""
        halflife = min(self.train.ema_halflife_samples, self.samples * self.train.ema_rampup)
        return 0.5 ** (batch / max(halflife, 1e-8))

    def step(self, batch: tuple) -> dict:
        """One optimizer step on ``batch`` with the noise level drawn from this block's (widened) range.

        Returns floats ``loss``, ``grad_norm``, ``lr`` and the detached per-sample level (key
        ``sigma``; MDM's t) and ``losses`` (for loss-per-level-bucket curves)."""
        n = batch[0].shape[0]
        level = self.levels.sample(n, self.spec.train_lo, self.spec.train_hi, self.generator).to(batch[0].device)
        lr = self.lr_at(self.samples)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        with self.mode.autocast(self.device):
            losses = self.loss_fn(self.net, batch, level, self.generator).float()
        loss = losses.mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients; no-op unless the loss is scaled
        grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), self.train.grad_clip)
        self.scaler.step(self.opt)  # skipped (and the scale lowered) when a scaled gradient overflowed
        self.scaler.update()
        self.step_count += 1
        self.samples += n
        self._update_ema(n)
        return {
            "loss": loss.item(),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "sigma": level.detach().cpu(),
            "losses": losses.detach().cpu(),
        }

    @torch.no_grad()
    def _update_ema(self, batch: int) -> None:
        beta = self.ema_beta(batch)
        torch._foreach_lerp_(*self._ema_pairs, 1.0 - beta)

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata): everything needed to continue bit-exactly, with no pickled object."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt = self.opt.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value)
        tensors["rng"] = self.generator.get_state()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        meta = {"step": self.step_count, "samples": self.samples, "block": self.spec.index, "param_groups": groups}
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("block") != self.spec.index:
            raise ValueError(
                f"checkpoint is for block {meta.get('block')}, this trainer trains block {self.spec.index}"
            )
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        template = self.opt.state_dict()
        groups = [  # JSON turned tuples (betas) into lists
            {**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}, "params": t["params"]}
            for g, t in zip(meta["param_groups"], template["param_groups"])
        ]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.generator.set_state(tensors["rng"])
        if self.scaler.is_enabled() and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.step_count, self.samples = meta["step"], meta["samples"]
