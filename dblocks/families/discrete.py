"""Logits out of the sampler, for every family whose target is discrete (ViT, AR, recurrent).

A discrete block's network gives logits over the fixed target table E; the sampler needs the
denoised estimate D(z) = softmax(logits) @ E (Sec. 3.4, design.md 1.4), and the evaluation needs
the logits themselves. :class:`DiscreteDenoiser` is that one adapter: the sampler sees a plain
denoiser, and the adapter keeps the logits of its latest call. :func:`chain_logits` runs the
Euler chain over the blocks and returns the logits of the first and of the final call (the final
call's argmax is the prediction; the first call, at sigma_max, is the calibrated one-call
distribution).

    denoisers = [DiscreteDenoiser(partial(net, images=x), net.label_table) for net in nets]
    first, final, router = chain_logits(denoisers, plan_boundaries(plan), z, levels.grid(B))
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..config import CeWeighting
from ..embedding import expected_embedding
from ..noise import route
from ..precond import SIGMA_DATA, loss_weight
from ..sampling import BlockRouter, sample_euler


# ---- the weighted cross-entropy of Eq. 6 ----------------------------------------------------------
def per_sample_weight(w: torch.Tensor) -> torch.Tensor:
    """Eq. 6 as written: each sample's CE times its own w(sigma)."""
    return w


def batch_mean_weight(w: torch.Tensor) -> torch.Tensor:
    """The official code's broadcast of a (N, 1) weight against a (N,) loss: every sample gets
    mean(w), so the batch's loss is mean(w) * mean(CE)."""
    return w.mean().expand_as(w)


CE_WEIGHTINGS: dict[CeWeighting, Callable[[torch.Tensor], torch.Tensor]] = {
    CeWeighting.per_sample: per_sample_weight,
    CeWeighting.batch_mean: batch_mean_weight,
}


def ce_weight(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA, weighting: str = CeWeighting.per_sample
) -> torch.Tensor:
    """The weight on each sample's CE (N,): w(sigma) of Eq. 6, spread by ``train.ce_weighting``."""
    return CE_WEIGHTINGS[CeWeighting(weighting)](loss_weight(sigma, sigma_data))


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy per sample, averaged over tokens: (N, K), (N,) or (N, T, K), (N, T) -> (N,)."""
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    return ce.reshape(labels.shape).flatten(1).mean(1) if labels.ndim > 1 else ce


def discrete_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    *,
    weighted: bool = True,
    ce_weighting: str = CeWeighting.per_sample,
) -> torch.Tensor:
    """Eq. 6 for a discrete target, per sample (N,): ``ce_weight`` * CE; ``weighted=False``: the plain CE.

    ``per_sample`` is bit-identical to ``dblocks.loss.weighted_ce``; ``batch_mean`` gives
    mean(w) * CE_i, whose batch mean is mean(w) * mean(CE)."""
    ce = token_ce(logits, labels)
    return ce_weight(sigma, sigma_data, ce_weighting).to(ce.dtype) * ce if weighted else ce


class DiscreteDenoiser:
    """D(z, level, **cond) = softmax(logits) @ E around ``logits_fn(z, level, **cond) -> (..., K)``.

    ``last_logits`` holds the logits of the latest call, ``calls`` counts the calls. ``table`` is
    the fixed target table E (K, D) the logits range over.
    """

    def __init__(self, logits_fn: Callable[..., torch.Tensor], table: torch.Tensor):
        self.logits_fn, self.table = logits_fn, table
        self.last_logits: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, z: torch.Tensor, level: torch.Tensor, **cond) -> torch.Tensor:
        self.last_logits = self.logits_fn(z, level, **cond)
        self.calls += 1
        return expected_embedding(self.last_logits, self.table).to(z.dtype)


class ChainLogits(NamedTuple):
    first: torch.Tensor  # logits of the sampler's first call (at grid[0])
    final: torch.Tensor  # logits of the final call (at grid[-1]): the prediction
    router: BlockRouter  # router.calls counts the calls per block


@torch.no_grad()
def chain_logits(
    denoisers: Sequence[DiscreteDenoiser],
    boundaries: Sequence[float],
    z: torch.Tensor,
    grid: torch.Tensor,
    **cond,
) -> ChainLogits:
    """Euler over ``grid`` (descending sigma) from ``z`` through the blocks routed by ``boundaries``
    (B+1 ascending; one block: its whole range), ``cond`` passed to every call (Sec. 3.4)."""
    router = BlockRouter(denoisers, boundaries)
    owner = lambda level: denoisers[int(route(float(level), router.boundaries))]  # noqa: E731
    first: list[torch.Tensor] = []

    def denoise(z: torch.Tensor, level: torch.Tensor, **extra) -> torch.Tensor:
        out = router(z, level, **extra)
        if not first:  # every row of a sampler call sits at the same grid point: one block answered
            first.append(owner(level[0]).last_logits)
        return out

    sample_euler(denoise, z, grid, extra_args=cond)
    return ChainLogits(first[0], owner(grid[-1]).last_logits, router)


# ---- decoding a next character (sample-based evaluation, issue 15) --------------------------------
def pick_argmax(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Greedy decoding: argmax over the last axis, (..., K) -> (...)."""
    return logits.argmax(-1)


def pick_temperature(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Ancestral sampling from softmax(logits / temperature), (..., K) -> (...)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    flat = torch.multinomial(probs.flatten(0, -2).cpu(), 1, generator=generator)
    return flat.reshape(logits.shape[:-1]).to(logits.device)


def pick_top_p(logits: torch.Tensor, generator: torch.Generator, top_p: float = 0.95) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): sample from the smallest set of most likely tokens
    whose probability reaches ``top_p``, renormalised, (..., K) -> (...)."""
    probs = torch.softmax(logits.double(), -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the mass before a token is below top_p: it is in the set
    nucleus = torch.zeros_like(probs).scatter(-1, order, torch.where(keep, sorted_p, 0.0))
    return pick_temperature(nucleus.log(), generator)


class Decoder(NamedTuple):
    """One way to decode a model's next character: ``logits(x, generator)`` (N, T) -> (N, T, K) for
    every position, then ``pick(logits, generator)`` -> ids (N, T)."""

    logits: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    pick: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def lm_decoders(logits_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> dict[str, Decoder]:
    """An end-to-end LM's decodings: ``argmax``, ``sampled`` (temperature 1) and ``top_p`` (0.95)."""
    return {
        "argmax": Decoder(logits_fn, pick_argmax),
        "sampled": Decoder(logits_fn, pick_temperature),
        "top_p": Decoder(logits_fn, pick_top_p),
    }


def chain_decoders(chain_fn: Callable[..., torch.Tensor]) -> dict[str, Decoder]:
    """The DiffusionBlocks chain's decodings, argmax of its final call's logits either way (Sec. 3.4):
    ``sampled`` from z ~ N(0, sigma_max^2 I), the chain as the sampler it is; ``argmax`` its
    deterministic variant, from z = 0 (the mean of that noise). ``chain_fn(x, generator, noise=s)``
    runs the chain from z = s sigma_max eps."""
    return {
        "argmax": Decoder(partial(chain_fn, noise=0.0), pick_argmax),
        "sampled": Decoder(partial(chain_fn, noise=1.0), pick_argmax),
    }
