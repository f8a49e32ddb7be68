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

from ..datacard import DataCard, SplitSource
from ..errors import ConfigError
from ..levels import Levels, SigmaLevels
from ..plan import BlockSpec, make_plan

if TYPE_CHECKING:  # the config imports the registry; the families only read a RunConfig
    from ..config import RunConfig

CHAMPION_MIN_ACCURACY = 0.8  # the digits families' headline threshold (samples' / test accuracy)

# loss(net, batch, level, generator) -> per-sample loss (N,): level is sigma or MDM's t.
LossFn = Callable[[nn.Module, tuple, torch.Tensor, torch.Generator], torch.Tensor]


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

    def loss(self, cfg, levels: Levels, *, baseline: bool, weighted: bool) -> LossFn:
        """The per-sample loss: Eq. 6 for a block (``weighted=False``: without w(sigma), the
        ablation); the baseline's own objective for ``baseline`` (unchanged by ``weighted``)."""
        if baseline:
            return self.baseline_loss
        return partial(self.block_loss, sigma_data=levels.sigma_data, weighted=weighted)

    # ---- inference -----------------------------------------------------------------------
    # (net, sigma_data) -> the sampler's callable D(z, sigma, **cond); the default ``denoiser`` binds it.
    make_denoiser: ClassVar[Callable[..., Callable]]

    def denoiser(self, net: nn.Module, levels: Levels):
        """A trained block as the sampler's callable D(z, level, **cond)."""
        return self.make_denoiser(net, levels.sigma_data)

    def evaluate(
        self, nets: Sequence[nn.Module], plan: Sequence[BlockSpec], run: RunConfig, data: SplitSource, *, baseline: bool
    ) -> dict:
        """Metrics of one trained model (B blocks, or ``[net]`` of the baseline) on the run's held-out
        ``data``; floats keyed as in ``rows`` and ``headline``, plus ``samples``/``labels`` (images)
        or ``sample_text`` (text)."""
        raise NotImplementedError

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
