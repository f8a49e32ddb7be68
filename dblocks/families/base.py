"""What a family is: one object that knows everything the rest of the system asks of a model kind.

The network, its config dataclass and its named sizes live in ``dblocks/models/<family>.py``
(DiT's ``models.py`` shape). Everything else a family does lives behind :class:`Family`, one
subclass per family in ``dblocks/families/<family>.py``, collected in ``FAMILIES``
(``dblocks/families/__init__.py``). Trainer, worker, coordinator, sampler and registry only ever
call these methods: a sixth family is two new files plus one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

from ..config import CeWeighting
from ..datacard import DataCard, SplitSource
from ..errors import ConfigError
from ..levels import Levels, SigmaLevels
from ..plan import BlockSpec, make_plan
from .discrete import Decoder, ce_weight

if TYPE_CHECKING:  # the config imports the registry; the families only read a RunConfig
    from ..config import RunConfig

CHAMPION_MIN_ACCURACY = 0.8  # the digits families' headline threshold (samples' / test accuracy)

# loss(net, batch, level, generator) -> per-sample loss (N,): level is sigma or MDM's t.
LossFn = Callable[[nn.Module, tuple, torch.Tensor, torch.Generator], torch.Tensor]


def unit_weight(level: torch.Tensor) -> torch.Tensor:
    """The weight of an unweighted loss: 1 for every sample (N,)."""
    return torch.ones(level.shape, dtype=torch.float64)


def effective_batch(w: torch.Tensor) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of one batch's per-sample loss weights w (N,):
    N when all weights are equal, 1 when one sample carries all of it."""
    w = w.double()
    return float(w.sum() ** 2 / w.square().sum())


@dataclass(frozen=True)
class WeightedLoss:
    """A family's per-sample loss (a ``LossFn``) with the weight it puts on each sample at a batch
    of levels, ``weight(level) -> (N,)`` (the worker logs :func:`effective_batch` of it)."""

    fn: LossFn
    weight: Callable[[torch.Tensor], torch.Tensor] = unit_weight

    def __call__(self, net: nn.Module, batch: tuple, level: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.fn(net, batch, level, generator)


def refuse_batch_mean(run: RunConfig, why: str) -> None:
    """The one-line ConfigError of a family whose loss is not a weighted CE of Eq. 6."""
    if run.train.ce_weighting == CeWeighting.batch_mean:
        raise ConfigError(f"train.ce_weighting=batch_mean: {why}; use per_sample")


@dataclass(frozen=True)
class Row:
    """One row of the results table: a label, the results key, a format (``"{:.3f}"``); ``index``
    picks one entry of a list-valued result (e.g. the per-range held-out loss)."""

    label: str
    key: str
    fmt: str
    index: int | None = None

    def cell(self, result: dict) -> str:
        """This row's formatted value in one model's results, ``-`` where it has none."""
        value = result.get(self.key)
        if self.index is not None and isinstance(value, (list, tuple)):
            value = value[self.index]
        return self.fmt.format(value) if isinstance(value, float) else "-"


@dataclass(frozen=True)
class Headline:
    """The family's headline metric and the registry's ``champion`` rule for it."""

    key: str  # a float in the results dict
    higher_is_better: bool
    threshold: float  # champion at or beyond this (``registry.champion_threshold`` overrides)

    def passes(self, value: float, threshold: float | None = None) -> bool:
        t = self.threshold if threshold is None else threshold
        return value >= t if self.higher_is_better else value <= t


@dataclass(frozen=True)
class Array:
    """One array of a registered block's ``predict``: its dtype, its shape (None: any length; the
    batch comes first) and the value the input example holds (the model signature and example)."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]
    fill: float = 0.0

    def example(self, free: int = 2) -> torch.Tensor:
        """This array with every free axis ``free`` long, filled with ``fill``."""
        return torch.full(tuple(free if n is None else n for n in self.shape), self.fill, dtype=self.dtype)


BATCH_SIGMA = Array(torch.float32, (None,), fill=1.0)  # the noise level of each row: in every block's range


class Family:
    """The interface every family implements (subclass and fill in; see DiT for the reference)."""

    name: ClassVar[str]  # the ``model`` config group option: dit, vit, ar, mdm, recurrent
    data: ClassVar[str]  # the built-in data set it trains on by default: digits | text
    kind: ClassVar[str]  # the kind of data it trains on: images | text (a prepared dataset's card.kind)
    config: ClassVar[type]  # the network's config dataclass (DiTConfig, ...)
    sizes: ClassVar[dict]  # named sizes of that config (DIT_SIZES, ...)
    one_block: ClassVar[bool] = False  # the recurrent core: DiffusionBlocks is a single block
    baseline_is_denoiser: ClassVar[bool] = False  # the end-to-end model is itself a denoiser (DiT)
    rows: ClassVar[tuple[Row, ...]] = ()  # the results table
    headline: ClassVar[Headline]

    # ---- config --------------------------------------------------------------------------
    def levels(self, run: RunConfig) -> Levels:
        """The noise-level space its blocks partition (default: the run's sigma space ``noise``)."""
        return self.levels_of(run.model.resolved(), run.noise)

    def levels_of(self, cfg, noise: SigmaLevels) -> Levels:
        """The same from a network config and the ``noise`` section alone (an exported block's meta)."""
        return noise

    def check(self, run: RunConfig) -> None:
        """Cross-field config rules of this family; raise ConfigError with a one-line message."""

    def data_fields(self, card: DataCard, run: RunConfig) -> dict:
        """The ``model.*`` settings the data decides (input shape, classes, vocabulary), from its card;
        a dataset this family cannot train on is a one-line ConfigError."""
        if card.kind != self.kind:
            raise ConfigError(f"{run.data.name}: holds {card.kind}, model.family={self.name} trains on {self.kind}")
        if card.kind == "text":
            return {"vocab_size": card.vocab_size}
        c, h, w = card.shape
        if h != w:
            raise ConfigError(
                f"{run.data.name}: images are {h}x{w}, the models take square images; "
                "prepare them with image_size=N (resize and center-crop)"
            )
        return {"image_size": h, "channels": c, "num_classes": card.num_classes}

    # ---- training ------------------------------------------------------------------------
    # Subclasses set ``build = staticmethod(build_<family>)``: (cfg, spec, *, baseline, seed) -> the
    # network of block ``spec.index`` (``spec.num_layers`` layers) or of the end-to-end baseline.
    build: ClassVar[Callable[..., nn.Module]]
    # The default ``loss`` binds these: Eq. 6 for a block, (net, batch, sigma, generator, sigma_data,
    # *, weighted), and the baseline's own objective, (net, batch, sigma, generator).
    block_loss: ClassVar[Callable[..., torch.Tensor]]
    baseline_loss: ClassVar[LossFn]

    def loss(
        self, cfg, levels: Levels, *, baseline: bool, weighted: bool, ce_weighting: str = CeWeighting.per_sample
    ) -> WeightedLoss:
        """The per-sample loss of a discrete family: Eq. 6 for a block (``weighted=False``: without
        w(sigma), the ablation; ``ce_weighting``: :func:`~.discrete.ce_weight`); the baseline's own
        objective for ``baseline`` (unweighted, unchanged by either)."""
        if baseline:
            return WeightedLoss(self.baseline_loss)
        sd = levels.sigma_data
        fn = partial(self.block_loss, sigma_data=sd, weighted=weighted, ce_weighting=ce_weighting)
        return WeightedLoss(fn, partial(ce_weight, sigma_data=sd, weighting=ce_weighting) if weighted else unit_weight)

    # ---- inference -----------------------------------------------------------------------
    # (net, sigma_data) -> the sampler's callable D(z, sigma, **cond); the default ``denoiser`` binds it.
    make_denoiser: ClassVar[Callable[..., Callable]]

    def denoiser(self, net: nn.Module, levels: Levels):
        """A trained block as the sampler's callable D(z, level, **cond)."""
        return self.make_denoiser(net, levels.sigma_data)

    def predict_arrays(self, cfg) -> tuple[dict[str, Array], Array]:
        """What a registered block's ``predict`` takes and returns: D(z, sigma, **cond)'s arrays by name
        (``z``, ``sigma``, then the family's ``cond``) and its output, for network config ``cfg``."""
        raise NotImplementedError

    def evaluate(
        self, nets: Sequence[nn.Module], plan: Sequence[BlockSpec], run: RunConfig, data: SplitSource, *, baseline: bool
    ) -> dict:
        """Metrics of one trained model (B blocks, or ``[net]`` of the baseline) on the run's held-out
        ``data``; floats keyed as in ``rows`` and ``headline``, plus ``samples``/``labels`` (images)
        or ``sample_text`` (text)."""
        raise NotImplementedError

    def decoders(
        self, nets: Sequence[nn.Module], plan: Sequence[BlockSpec], run: RunConfig, *, baseline: bool
    ) -> dict[str, Decoder]:
        """The ways to decode a next character of a trained text model (``argmax``, ``sampled``, and
        the end-to-end model's ``top_p``), for the judge's sample-based metrics (dblocks/judge.py)."""
        raise NotImplementedError(f"the {self.name} family does not decode characters one at a time")

    def generate(
        self,
        nets: Sequence[nn.Module],
        plan: Sequence[BlockSpec],
        levels: Levels,
        labels: torch.Tensor,
        sample,
        *,
        seed: int,
    ) -> torch.Tensor:
        """Class-conditional samples of a set (``sample``: the run's SampleConfig); image families only."""
        raise NotImplementedError(f"the {self.name} family does not generate class-conditional samples")

    def table_rows(self, run: RunConfig) -> list[Row]:
        """The rows of the run's results table (default: ``rows``)."""
        return list(self.rows)

    def summary(self, run: RunConfig) -> str:
        """What the run's summary line says about inference (e.g. the DiT's guidance); may be empty."""
        return ""

    def passes(self, results: dict, run: RunConfig) -> bool:
        """Whether a trained set earns the registry's ``champion`` alias (never without its headline
        metric, e.g. the DiT's sample accuracy on unlabelled data)."""
        value = results.get(self.headline.key)
        return isinstance(value, float) and self.headline.passes(value, run.registry.champion_threshold)


def plan_for(run: RunConfig, num_blocks: int) -> list[BlockSpec]:
    """The run's plan of ``num_blocks`` blocks over its family's noise levels (Sec. 3.2-3.3)."""
    layers = run.model.resolved().layers
    return make_plan(run.levels, num_blocks, layers, gamma=run.blocks.gamma, partition=run.blocks.partition)


def eval_ranges(run: RunConfig) -> list[tuple[float, float]]:
    """The ranges of the per-range held-out loss: the DiffusionBlocks plan's, for every model of the run."""
    return [(s.lo, s.hi) for s in plan_for(run, run.blocks.num)]
