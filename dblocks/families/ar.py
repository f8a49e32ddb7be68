"""The autoregressive family (design.md 1.5): Eq. 6 on the next token's embedding, greedy decoding.

A block's loss is Eq. 6 for a discrete target: z_i = E[y_i] + sigma eps_i for the next tokens
y = tokens[:, 1:] given the clean past x = tokens[:, :-1], w(sigma) CE of the logits (plain CE
with ``weighted=False``). With the mixed head (lowest-noise block) the plain next-token CE of the
clean stream is added, never weighted. The end-to-end baseline is a causal LM on next-token CE.

Decoding is greedy, B Euler steps per token over a B-point CDF grid (one call per block), from
z ~ N(0, sigma_max^2 I); the final call's logits give the token (Sec. 3.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import CeWeighting
from ..datacard import Vocabulary
from ..levels import SigmaLevels
from ..models.ar import AR_SIZES, ARBaseline, ARBlock, ARConfig, build_ar
from ..plan import BlockSpec, plan_boundaries
from ..precond import SIGMA_DATA
from ..text import CHAMPION_MAX_BPC, SHAKESPEARE, TextSplit, next_token_pairs, text_split
from .base import BATCH_SIGMA, Array, Family, Headline, Row
from .discrete import (
    ChainLogits,
    Decoder,
    DiscreteDenoiser,
    chain_decoders,
    chain_logits,
    discrete_loss,
    lm_decoders,
    token_ce,
)

# ---- losses -------------------------------------------------------------------------------------
next_token_ce = token_ce  # plain next-token cross-entropy, averaged over positions: (N, T, K), (N, T) -> (N,)


def ar_loss(
    net: ARBlock,
    batch: tuple,
    sigma: torch.Tensor,
    generator: torch.Generator,
    sigma_data: float = SIGMA_DATA,
    *,
    weighted: bool = True,
    ce_weighting: str = CeWeighting.per_sample,
) -> torch.Tensor:
    """Per-sample Eq. 6: w(sigma) mean_i CE(logits_i, y_i) with z_i = E[y_i] + sigma eps_i (design.md 1.5);
    ``weighted=False``: without w(sigma); ``ce_weighting``: :func:`~.discrete.ce_weight`. With the
    mixed head, plus the unweighted plain next-token CE."""
    x, y = next_token_pairs(*batch)
    table = net.target_table
    eps = torch.randn((*y.shape, table.shape[1]), generator=generator, dtype=table.dtype).to(y.device)
    z = table[y] + sigma.to(table.dtype)[:, None, None] * eps  # (N, T, D)
    logits, next_logits = net(x, z, sigma, sigma_data)
    loss = discrete_loss(logits, y, sigma, sigma_data, weighted=weighted, ce_weighting=ce_weighting)
    return loss if next_logits is None else loss + next_token_ce(next_logits, y)


def ar_baseline_loss(net: ARBaseline, batch: tuple, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The baseline's plain next-token CE per sample (ignores sigma and the generator)."""
    x, y = next_token_pairs(*batch)
    return next_token_ce(net(x), y)


# ---- decoding -----------------------------------------------------------------------------------
class _BlockLogits:
    """A block's logits for the sampler's :class:`DiscreteDenoiser`, z (N, M, D), context (N, T); keeps
    the mixed head's next-token logits of the same call (``next_logits``, None without the head)."""

    def __init__(self, net: ARBlock, sigma_data: float):
        self.net, self.sigma_data = net.eval(), sigma_data
        self.next_logits: torch.Tensor | None = None

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        logits, self.next_logits = self.net(context, z, sigma, self.sigma_data)
        return logits


def ar_denoiser(net: ARBlock, sigma_data: float = SIGMA_DATA) -> DiscreteDenoiser:
    """D(z, sigma, context) = softmax(logits) @ E (Sec. 3.4) for one trained block."""
    return DiscreteDenoiser(_BlockLogits(net, sigma_data), net.target_table)


def _chain(denoisers: list[DiscreteDenoiser], plan: list[BlockSpec], context, z, levels: SigmaLevels) -> ChainLogits:
    """The Euler chain from z ~ N(0, sigma_max^2 I) on B points equally spaced in the truncated CDF,
    one in each block's range (B = 1: both ends), so one call per block."""
    grid = levels.grid(max(len(plan), 2))
    return chain_logits(denoisers, plan_boundaries(plan), z, grid, context=context)


def _device(nets: list[nn.Module]) -> torch.device:
    return next(nets[0].parameters()).device


@torch.no_grad()
def generate_ar(
    nets: list[nn.Module],
    plan: list[BlockSpec],
    levels: SigmaLevels,
    prompt: str,
    num_chars: int,
    *,
    baseline: bool,
    seed: int = 0,
    vocab: Vocabulary = SHAKESPEARE,
) -> str:
    """Greedy decoding: prompt + ``num_chars`` characters (context cropped to the last seq_len).

    Blocks: per token, z ~ N(0, sigma_max^2 I) (``torch.randn(1, 1, width)`` from one generator
    seeded with ``seed``), B Euler steps over the blocks (one call each), token = argmax of the
    final call's logits. Baseline: argmax of the LM's logits.
    """
    if not prompt:
        raise ValueError("generate_ar: the prompt must hold at least one character")
    for net in nets:
        net.eval()
    device, cfg = _device(nets), nets[0].cfg
    ids = vocab.encode(prompt).to(device)
    g = torch.Generator().manual_seed(seed)
    denoisers = [ar_denoiser(net, levels.sigma_data) for net in nets] if not baseline else []
    for _ in range(num_chars):
        ctx = ids[-cfg.seq_len :][None]  # (1, t)
        if baseline:
            logits = nets[0](ctx)[:, -1]
        else:
            z = levels.sigma_max * torch.randn(1, 1, cfg.width, generator=g).to(device)
            logits = _chain(denoisers, plan, ctx, z, levels).final[:, -1]
        ids = torch.cat([ids, logits.argmax(-1)])
    return vocab.decode(ids.tolist())


def ar_decoders(nets: list[nn.Module], plan: list[BlockSpec], levels: SigmaLevels, *, baseline: bool) -> dict:
    """The next-character decodings of the sample-based evaluation: the LM's logits
    (``discrete.lm_decoders``) or the B-step chain's final logits (``discrete.chain_decoders``),
    every draw from the caller's generator."""
    for net in nets:
        net.eval()
    if baseline:
        return lm_decoders(lambda x, g: nets[0](x))
    denoisers = [ar_denoiser(net, levels.sigma_data) for net in nets]
    width, device = nets[0].cfg.width, _device(nets)

    def chain(x: torch.Tensor, generator: torch.Generator, *, noise: float) -> torch.Tensor:
        z = (noise * levels.sigma_max) * torch.randn(*x.shape, width, generator=generator).to(device)
        return _chain(denoisers, plan, x, z, levels).final

    return chain_decoders(chain)


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_ar(
    nets: list[nn.Module],
    plan: list[BlockSpec],
    split: TextSplit,
    levels: SigmaLevels,
    *,
    baseline: bool,
    seed: int = 0,
    windows: int = 256,
    batch_size: int = 64,
    sample_chars: int = 200,
) -> dict:
    """Teacher-forced metrics on the first ``windows`` validation windows, all positions in parallel.

    val_ce (nats/char) and val_accuracy from the final call's logits (at sigma_min) after the
    B-step chain from seeded noise (baseline: the LM's logits); val_ce_sigma_max from block 0's
    logits at sigma_max; with the mixed head, val_ce_next_head; and sample_text from the split's ``prompt``.
    """
    for net in nets:
        net.eval()
    device, cfg = _device(nets), nets[0].cfg
    x, y = next_token_pairs(split.val[:windows].to(device))
    g = torch.Generator().manual_seed(seed)
    mixed = not baseline and nets[-1].next_head is not None
    z0 = None if baseline else levels.sigma_max * torch.randn(*y.shape, cfg.width, generator=g).to(device)
    denoisers = [ar_denoiser(net, levels.sigma_data) for net in nets] if not baseline else []
    sums = {"val_ce": 0.0, "val_accuracy": 0.0}
    if not baseline:
        sums["val_ce_sigma_max"] = 0.0
    if mixed:
        sums["val_ce_next_head"] = 0.0
    for a in range(0, len(x), batch_size):
        xb, yb = x[a : a + batch_size], y[a : a + batch_size]
        if baseline:
            final = nets[0](xb)
        else:
            first, final, _ = _chain(denoisers, plan, xb, z0[a : a + batch_size], levels)
            sums["val_ce_sigma_max"] += next_token_ce(first, yb).sum().item()
            if mixed:  # the last block ran the final call (at sigma_min)
                sums["val_ce_next_head"] += next_token_ce(denoisers[-1].logits_fn.next_logits, yb).sum().item()
        sums["val_ce"] += next_token_ce(final, yb).sum().item()
        sums["val_accuracy"] += (final.argmax(-1) == yb).double().mean(1).sum().item()
    out: dict = {k: v / len(x) for k, v in sums.items()}
    gen = dict(baseline=baseline, seed=seed, vocab=split.vocab)
    out["sample_text"] = generate_ar(nets, plan, levels, split.prompt, sample_chars, **gen)
    return out


# ---- the family -----------------------------------------------------------------------------------
class AR(Family):
    name = "ar"
    data = "text"
    kind = "text"
    config = ARConfig
    sizes = AR_SIZES
    rows = (
        Row("val CE at sigma_min (nats/char)", "val_ce", "{:.3f}"),
        Row("val CE at sigma_max (nats/char)", "val_ce_sigma_max", "{:.3f}"),
        Row("val next-char accuracy", "val_accuracy", "{:.1%}"),
    )
    headline = Headline("val_bpc", higher_is_better=False, threshold=CHAMPION_MAX_BPC)

    build = staticmethod(build_ar)
    block_loss = staticmethod(ar_loss)
    make_denoiser = staticmethod(ar_denoiser)

    def predict_arrays(self, cfg: ARConfig) -> tuple[dict[str, Array], Array]:
        targets = Array(torch.float32, (None, None, cfg.width))  # the last M positions' noisy targets
        return {"z": targets, "sigma": BATCH_SIGMA, "context": Array(torch.int64, (None, None))}, targets

    baseline_loss = staticmethod(ar_baseline_loss)

    def decoders(self, nets, plan, run, *, baseline: bool) -> dict[str, Decoder]:
        return ar_decoders(list(nets), list(plan), run.levels, baseline=baseline)

    def evaluate(self, nets, plan, run, data, *, baseline: bool) -> dict:
        """evaluate_ar's metrics plus the headline ``val_bpc`` = val_ce / ln 2."""
        split = text_split(data, run.model.resolved().seq_len)
        out = evaluate_ar(list(nets), list(plan), split, run.levels, baseline=baseline, seed=run.seed)
        return {**out, "val_bpc": out["val_ce"] / math.log(2)}
