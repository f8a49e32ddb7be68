"""The recurrent-depth family (design.md 1.5): the core as ONE denoiser vs truncated BPTT.

DiffusionBlocks trains the core in a single pass at a random sigma (Eq. 6 for the next token's
fixed embedding; plain CE with ``weighted=False``); the baseline unrolls K iterations from a random
state and backpropagates through the last ``bptt`` (plain next-token CE, never weighted).
Inference keeps the K-iteration loop as K Euler steps on the CDF grid ``levels.grid(K)``: the
prelude runs once, each step calls core + coda once, the final call's logits are the prediction.
The family always runs as one block (B = 1), so its one plan entry covers the whole sigma range.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CeWeighting
from ..errors import ConfigError
from ..levels import SigmaLevels
from ..models.recurrent import (
    RECURRENT_SIZES,
    RecurrentBaseline,
    RecurrentBlock,
    RecurrentConfig,
    RecurrentLM,
    build_recurrent,
)
from ..plan import BlockSpec
from ..precond import SIGMA_DATA
from ..text import CHAMPION_MAX_BPC, TextSplit, next_token_pairs, text_split
from .ar import next_token_ce
from .base import BATCH_SIGMA, Array, Family, Headline, Row
from .discrete import (
    ChainLogits,
    Decoder,
    DiscreteDenoiser,
    chain_decoders,
    chain_logits,
    discrete_loss,
    lm_decoders,
)


# ---- losses -------------------------------------------------------------------------------------
def recurrent_loss(
    net: RecurrentBlock,
    batch: tuple[torch.Tensor],
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
    *,
    weighted: bool = True,
    ce_weighting: str = CeWeighting.per_sample,
) -> torch.Tensor:
    """Per-sample Eq. 6 in ONE pass: z = E[y] + sigma eps, loss = w(sigma) mean_i CE(logits_i, y_i)
    (``weighted=False``: without w(sigma); ``ce_weighting``: :func:`~.discrete.ce_weight`)."""
    x, y = next_token_pairs(*batch)  # (N, T)
    eps = torch.randn((*y.shape, net.cfg.width), generator=generator).to(y.device)
    z = net.targets[y] + sigma.to(eps.dtype).reshape(-1, 1, 1) * eps  # (N, T, D)
    logits = net(z, sigma, net.context(x), sigma_data=sigma_data)
    return discrete_loss(logits, y, sigma, sigma_data, weighted=weighted, ce_weighting=ce_weighting)


def recurrent_baseline_loss(
    net: RecurrentBaseline, batch: tuple[torch.Tensor], sigma: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample next-character CE after K iterations from s_0 ~ N(0, init_std^2 I), truncated BPTT."""
    x, y = next_token_pairs(*batch)
    cfg = net.cfg
    s0 = cfg.init_std * torch.randn((*x.shape, cfg.width), generator=generator).to(y.device)
    return next_token_ce(net(net.context(x), s0, cfg.iterations, cfg.bptt), y)


# ---- inference ----------------------------------------------------------------------------------
def recurrent_denoiser(net: RecurrentBlock, sigma_data: float = SIGMA_DATA) -> DiscreteDenoiser:
    """D(z, sigma, context=e) = softmax(logits) @ E (design.md 1.4); e = the prelude's output, computed
    once per sequence and passed to every call."""
    return DiscreteDenoiser(partial(net, sigma_data=sigma_data), net.targets)


def _generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


@torch.no_grad()
def recurrent_chain(
    net: RecurrentBlock,
    x: torch.Tensor,
    levels: SigmaLevels,
    *,
    iterations: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    noise: float = 1.0,
) -> ChainLogits:
    """K = ``iterations`` (cfg default) Euler steps on ``levels.grid(K)`` from z = noise sigma_max N(0, I)
    (drawn from ``generator``, default one seeded ``seed``), one core + coda call each; the prelude runs once."""
    e = net.context(x)  # (N, T, D), once
    z = (noise * levels.sigma_max) * torch.randn(e.shape, generator=_generator(seed, generator)).to(e.device)
    grid = levels.grid(iterations or net.cfg.iterations)
    denoiser = recurrent_denoiser(net, levels.sigma_data)
    return chain_logits([denoiser], [levels.sigma_min, levels.sigma_max], z, grid, context=e)


@torch.no_grad()
def predict_recurrent(
    net: RecurrentLM,
    x: torch.Tensor,
    levels: SigmaLevels,
    *,
    iterations: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-character logits (N, T, V) for x (N, T) after K = ``iterations`` core calls (cfg default).

    DiffusionBlocks: the final call's logits of :func:`recurrent_chain`. Baseline: K recurrent
    iterations from s_0 ~ N(0, init_std^2 I), drawn from ``generator`` (default one seeded ``seed``).
    """
    if not isinstance(net, RecurrentBaseline):
        return recurrent_chain(net, x, levels, iterations=iterations, seed=seed, generator=generator).final
    e = net.context(x)
    s0 = net.cfg.init_std * torch.randn(e.shape, generator=_generator(seed, generator)).to(e.device)
    return net(e, s0, iterations or net.cfg.iterations)


def recurrent_decoders(net: RecurrentLM, levels: SigmaLevels, *, baseline: bool) -> dict[str, Decoder]:
    """The next-character decodings of the sample-based evaluation (``discrete.lm_decoders`` /
    ``discrete.chain_decoders``), every draw from the caller's generator."""
    net.eval()
    if baseline:
        return lm_decoders(lambda x, g: predict_recurrent(net, x, levels, generator=g))
    return chain_decoders(lambda x, g, noise: recurrent_chain(net, x, levels, generator=g, noise=noise).final)


def first_call_logits(net: RecurrentBlock, x: torch.Tensor, levels: SigmaLevels, *, seed: int = 0) -> torch.Tensor:
    """The logits of the sampler's first call (at sigma_max, the seeded z of :func:`predict_recurrent`).

    At sigma_max, z carries almost no signal, so these are the core's predictive distribution
    p(y_i | x_<=i): a calibrated one-call CE, unlike the final call's logits, which concentrate on
    the token the sampler committed to."""
    return recurrent_chain(net, x, levels, seed=seed).first


@torch.no_grad()
def generate_recurrent(
    net: RecurrentLM, prompt: torch.Tensor, num_chars: int, levels: SigmaLevels, **predict
) -> torch.Tensor:
    """Greedy generation: append argmax of the last position's prediction, ``num_chars`` times
    (the context is the last seq_len characters). Returns the prompt and continuation ids."""
    ids = prompt.to(net.targets.device)
    for _ in range(num_chars):
        logits = predict_recurrent(net, ids[-net.cfg.seq_len :][None], levels, **predict)
        ids = torch.cat([ids, logits[0, -1].argmax()[None]])
    return ids


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_recurrent(
    nets: list[nn.Module],
    plan: list[BlockSpec],
    split: TextSplit,
    levels: SigmaLevels,
    *,
    baseline: bool,
    seed: int = 0,
    windows: int = 256,
    iterations: int | None = None,
    sample_chars: int = 200,
) -> dict:
    """Teacher-forced next-character CE (nats/char), bits/char and accuracy of the prediction after
    K iterations on the first ``windows`` validation windows, plus a greedy sample from the split's ``prompt``.

    ``nets`` = [the one net], ``plan`` = its one BlockSpec (covering all of ``levels``).
    """
    if len(nets) != 1 or len(plan) != 1:
        raise ValueError(f"blocks.num={len(plan)}: the recurrent family runs as one block; use blocks.num=1")
    net = nets[0].eval()
    if baseline != isinstance(net, RecurrentBaseline):
        raise ValueError(f"baseline={baseline}, but the net is a {type(net).__name__}")
    opts = dict(iterations=iterations, seed=seed)
    val = split.val[:windows].to(net.targets.device)
    if val.shape[1] - 1 > net.cfg.seq_len:
        raise ValueError(f"validation windows of {val.shape[1] - 1} characters exceed model.seq_len={net.cfg.seq_len}")
    x, y = next_token_pairs(val)
    if baseline:
        logits = torch.cat([predict_recurrent(net, xb, levels, **opts) for xb in x.split(256)])
    else:
        chains = [recurrent_chain(net, xb, levels, **opts) for xb in x.split(256)]
        logits, first = torch.cat([c.final for c in chains]), torch.cat([c.first for c in chains])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()
    sample = generate_recurrent(net, split.vocab.encode(split.prompt), sample_chars, levels, **opts)
    metrics = {
        "val_loss": ce,
        "val_bpc": ce / math.log(2),
        "val_accuracy": (logits.argmax(-1) == y).double().mean().item(),
        "sample_text": split.vocab.decode(sample.tolist()),
    }
    if not baseline:  # the sampler's first call alone: the core's predictive distribution from pure noise
        metrics["val_loss_first_call"] = F.cross_entropy(first.flatten(0, 1).float(), y.flatten()).item()
    return metrics


# ---- the family -----------------------------------------------------------------------------------
class Recurrent(Family):
    name = "recurrent"
    data = "text"
    kind = "text"
    config = RecurrentConfig
    sizes = RECURRENT_SIZES
    one_block = True
    rows = (
        Row("val loss (nats/char)", "val_loss", "{:.3f}"),
        Row("val bits per character", "val_bpc", "{:.3f}"),
        Row("val next-char accuracy", "val_accuracy", "{:.1%}"),
    )
    headline = Headline("val_bpc", higher_is_better=False, threshold=CHAMPION_MAX_BPC)

    def check(self, run) -> None:
        if run.blocks.num != 1:
            raise ConfigError(
                f"blocks.num={run.blocks.num}: the recurrent family trains its core as one block; use blocks.num=1"
            )

    build = staticmethod(build_recurrent)
    block_loss = staticmethod(recurrent_loss)
    make_denoiser = staticmethod(recurrent_denoiser)

    def predict_arrays(self, cfg: RecurrentConfig) -> tuple[dict[str, Array], Array]:
        state = Array(torch.float32, (None, None, cfg.width))  # z and the prelude's output e: (N, T, width)
        return {"z": state, "sigma": BATCH_SIGMA, "context": state}, state

    baseline_loss = staticmethod(recurrent_baseline_loss)

    def decoders(self, nets, plan, run, *, baseline: bool) -> dict[str, Decoder]:
        return recurrent_decoders(nets[0], run.levels, baseline=baseline)

    def evaluate(self, nets, plan, run, data, *, baseline: bool) -> dict:
        split = text_split(data, run.model.resolved().seq_len)
        return evaluate_recurrent(list(nets), list(plan), split, run.levels, baseline=baseline, seed=run.seed)
